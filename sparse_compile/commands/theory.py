"""``sparse-compile theory --plot out.png [--json out.json]``: output-norm variance against k/n
(the paper's Fig. 1b): closed forms of :mod:`sparse_compile.analysis.theory` as curves, the Monte Carlo
simulation of the layer as points with error bars."""
from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "bernoulli": "Bernoulli",
    "constant_per_layer": "constant per layer",
    "constant_fan_in": "constant fan-in",
}
COLORS = {"bernoulli": "tab:blue", "constant_per_layer": "tab:orange", "constant_fan_in": "tab:green"}


def register(sub) -> None:
    """Add the ``theory`` subcommand."""
    p = sub.add_parser("theory", help="output-norm variance of sparse layers: closed forms against simulation")
    p.add_argument("--plot", metavar="PNG", help="write the Fig. 1b-style plot here")
    p.add_argument("--json", metavar="JSON", help="write the plotted numbers here")
    p.add_argument("--n", type=int, default=64, help="layer width n (default 64)")
    p.add_argument("--trials", type=int, default=4000, help="Monte Carlo trials per simulated point (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation (default 0)")
    p.set_defaults(func=run)


def plot(curves: dict, path) -> None:
    """Two panels: the variance, and the variance relative to the Bernoulli closed form (where the
    few-percent gaps between the kinds are visible). Error bars are 2 standard errors."""
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency (extra "demo")
        raise ValueError("plotting needs matplotlib: pip install 'sparse_compile[demo]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.theory import output_norm_variance

    n = curves["n"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, label in LABELS.items():
        c, col = curves["closed_form"][kind], COLORS[kind]
        xs = [p["k_over_n"] for p in c]
        a.plot(xs, [p["variance"] for p in c], color=col, label=f"{label} (closed form)")
        bern = [output_norm_variance("bernoulli", n, p["k"]) for p in c]
        b.plot(xs, [p["variance"] / q for p, q in zip(c, bern)], color=col, label=label)
        s = curves["simulated"][kind]
        sx = [p["k_over_n"] for p in s]
        a.errorbar(sx, [p["variance"] for p in s], yerr=[2 * p["se"] for p in s], fmt="o", ms=3.5,
                   color=col, capsize=2, label=f"{label} (simulated, ±2 SE)")
        sb = [output_norm_variance("bernoulli", n, p["k"]) for p in s]
        b.errorbar(sx, [p["variance"] / q for p, q in zip(s, sb)], yerr=[2 * p["se"] / q for p, q in zip(s, sb)],
                   fmt="o", ms=3.5, color=col, capsize=2)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("k / n")
    a.set_ylabel(r"Var$(\|z^{l+1}\|^2 / \|z^l\|^2)$")
    a.set_title(f"output-norm variance, n = {n}, {curves['trials']} trials per point")
    a.legend(fontsize=7)
    b.set_xscale("log")
    b.set_xlabel("k / n")
    b.set_ylabel("variance / Bernoulli closed form")
    b.set_title("relative to Bernoulli sparsity")
    b.axhline(1.0, color="0.7", lw=0.8)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(args) -> int:
    """Compute the curves, print a table, write the plot and/or JSON."""
    from ..analysis.theory import KINDS, printed_output_norm_variance, variance_curves

    if args.n < 2:
        raise ValueError(f"--n must be >= 2, got {args.n}")
    if args.trials < 100:
        raise ValueError(f"--trials must be >= 100, got {args.trials}")
    curves = variance_curves(n=args.n, trials=args.trials, seed=args.seed)
    print(f"output-norm variance, n={args.n}, {args.trials} trials per simulated point")
    print(f"{'kind':20s} {'k':>4s} {'closed form':>12s} {'simulated':>12s} {'SE':>9s} {'z':>6s} "
          f"{'printed (A)':>12s} {'z (A)':>8s}")
    for kind in KINDS:
        cf = {p["k"]: p["variance"] for p in curves["closed_form"][kind]}
        for p in curves["simulated"][kind]:
            z = (p["variance"] - cf[p["k"]]) / p["se"] if p["se"] > 0 else float("nan")
            pa = printed_output_norm_variance(kind, args.n, p["k"], "A")
            za = (p["variance"] - pa) / p["se"] if p["se"] > 0 else float("nan")
            print(f"{kind:20s} {p['k']:4d} {cf[p['k']]:12.5f} {p['variance']:12.5f} {p['se']:9.5f} {z:+6.2f} "
                  f"{pa:12.5f} {za:+8.1f}")
    print("closed form: derived from Tables 6-8 (18 n/k); printed (A): Eqs. (1)-(3) as printed (18 k/n); "
          "z = (simulated - formula) / SE")
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(curves, args.plot)
        print(f"wrote {args.plot}")
    return 0
