"""``sparse-compile plot-itop REPORT.json -o out.png``: in-time over-parameterisation (ITOP) rate
against training step (Appendix H, Figs. 14-17), global and per layer, from a trainer report."""
from __future__ import annotations

import json
import math
from pathlib import Path

MAX_LEGEND = 12  # more layers than this get a colour bar over layer depth instead of a legend


def register(sub) -> None:
    """Add the ``plot-itop`` subcommand."""
    p = sub.add_parser("plot-itop", help="plot the ITOP rate over training from a trainer report JSON")
    p.add_argument("report", help="report.json of sparse-compile train, or a sparsifier report JSON "
                                  '({"history": [{"step", "itop", "layers": {name: rate}}]})')
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="where to write the plot")
    p.add_argument("--title", default=None, help="plot title (default: the report file name)")
    p.set_defaults(func=run)


def _rate(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{where}: ITOP rate must be a number in [0, 1], got {v!r}")
    return float(v)


def load_history(path) -> tuple[list[int], list[float], dict[str, list[tuple[int, float]]]]:
    """Steps, global rates and ``{layer: [(step, rate), ...]}`` from a report, validated.

    Raises ``ValueError`` naming the offending entry for malformed input.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"report not found: {path}")
    try:
        rep = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(rep, dict) and "sparsifier" in rep:
        # `sparse-compile train`'s report.json: its top-level "history" is per epoch (no ITOP); the
        # sparsifier's report holds the per-update history.
        if not isinstance(rep["sparsifier"], dict):
            raise ValueError(f"{path}: a dense training run (no sparsifier) has no ITOP history")
        rep = rep["sparsifier"]
    hist = rep.get("history") if isinstance(rep, dict) else None
    if not isinstance(hist, list) or not hist:
        raise ValueError(f'{path}: expected a non-empty "history" list of {{"step", "itop", "layers"}} entries '
                         '(a sparsifier report, or the report.json of sparse-compile train)')
    steps, rates, layers = [], [], {}
    for i, h in enumerate(hist):
        where = f"{path}: history[{i}]"
        if not isinstance(h, dict) or "step" not in h or "itop" not in h:
            raise ValueError(f'{where}: expected an object with "step" and "itop"')
        s = h["step"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{where}: step must be a non-negative integer, got {s!r}")
        if steps and s <= steps[-1]:
            raise ValueError(f"{where}: steps must increase, got {s} after {steps[-1]}")
        steps.append(s)
        rates.append(_rate(h["itop"], where))
        per = h.get("layers", {})
        if not isinstance(per, dict):
            raise ValueError(f'{where}: "layers" must map layer names to rates')
        for name, v in per.items():
            layers.setdefault(str(name), []).append((s, _rate(v, f"{where}.layers[{name!r}]")))
    return steps, rates, layers


def plot(steps, rates, layers, path, title: str = "") -> None:
    """Global ITOP as a thick black line, each layer as a thin line coloured by its depth."""
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency (extra "demo")
        raise ValueError("plotting needs matplotlib: pip install 'sparse_compile[demo]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    cmap = plt.get_cmap("viridis")
    names = list(layers)
    for i, name in enumerate(names):
        xs, ys = zip(*layers[name])
        ax.plot(xs, ys, lw=0.9, alpha=0.8, color=cmap(i / max(1, len(names) - 1)),
                label=name if len(names) <= MAX_LEGEND else None)
    ax.plot(steps, rates, lw=2.6, color="black", label="global")
    ax.set_xlabel("training step")
    ax.set_ylabel("ITOP rate (fraction of weights ever active)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(names) > MAX_LEGEND:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(names) - 1))
        fig.colorbar(sm, ax=ax, label="layer index (model order)")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(args) -> int:
    """Read the report, plot it, print the final rates."""
    steps, rates, layers = load_history(args.report)
    plot(steps, rates, layers, args.output, args.title if args.title is not None else Path(args.report).name)
    print(f"{len(steps)} points, steps {steps[0]}..{steps[-1]}, final global ITOP {rates[-1]:.4f}, {len(layers)} layers")
    print(f"wrote {args.output}")
    return 0
