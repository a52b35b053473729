"""Test accuracy of dense, StaticSparse, RigL and SRigL (with and without ablation) on MNIST and
Fashion-MNIST, at 90 / 95 / 98 / 99% sparsity over several seeds (CPU).

    make data                                          # MNIST and Fashion-MNIST, once
    .venv/bin/python -m bench.accuracy                 # the README tables and plots (see the budget below)
    .venv/bin/python -m bench.accuracy --quick         # a few minutes: 1 epoch, 90/99%, seeds 0 1
    .venv/bin/python -m bench.accuracy --dataset mnist --methods rigl srigl_abl --sparsities 0.99 --seeds 0 1 2
    .venv/bin/python -m bench.accuracy --report-only   # tables, plots, widths from the results so far

Every run is the recipe ``lenet300_100_mnist`` (LeNet-300-100) or ``small_cnn_fashion_mnist`` (conv 5x5
x8, pool, conv 5x5 x16, pool, fc 784-64, fc 64-10) trained by the loop of ``sparse-compile train``:
batch 128, SGD lr 0.1 momentum 0.9, cosine decay, ERK budgets, delta_t 100, alpha 0.3, t_end 0.75.
``srigl`` is SRigL without ablation (gamma_sal 0), ``srigl_abl`` with ablation (gamma_sal 0.3). Dense
runs once per seed; then the sparsities run from the highest down. Each finished run is appended to
``OUT/<dataset>.jsonl`` at once (an interrupted grid resumes where it stopped; ``--fresh`` starts over). Written per data set: ``<dataset>.md`` (mean
+- sample std table, final active widths per layer of SRigL at the highest sparsity (the paper's
Fig. 11), the budget SRigL's ``k' = floor(budget / active neurons)`` rounding leaves unused per layer),
``<dataset>.png`` (accuracy vs sparsity with error bars), ``<dataset>_widths.png`` (Fig. 11 as bars)
and ``<dataset>_summary.json``. Trained
SRigL (ablation) and dense models of the first seed are saved under ``OUT/models/`` for
``bench/accuracy_deploy.py`` (inference speed and size after ``optimize``).

Budget: ``cpu_s`` in each record is the run's process CPU time, i.e. its cost on an idle core; the
report sums it (the default grid is 2 x 51 runs, split over 2 processes, one per data set).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

RECIPES = {"mnist": "lenet300_100_mnist", "fashion-mnist": "small_cnn_fashion_mnist"}
EPOCHS = {"mnist": 10, "fashion-mnist": 5}
SPARSITIES = (0.9, 0.95, 0.98, 0.99)
OUT = Path(__file__).resolve().parent / "out" / "accuracy"


def _make(cls_name: str, **extra):
    """A constructor ``(recipe, model, optimizer, total_steps) -> sparsifier`` of ``sparse_compile.<cls_name>``
    with the recipe's shared settings and ``extra`` keyword options."""

    def build(recipe, model, optimizer, total_steps):
        import sparse_compile

        cls = getattr(sparse_compile, cls_name)
        return cls(model, optimizer, sparsity=recipe.sparsity, total_steps=total_steps,
                   distribution=recipe.distribution, delta_t=recipe.delta_t, alpha=recipe.alpha,
                   t_end=recipe.t_end, **extra)

    return build


# name -> (label, constructor or None for dense). A new method is one line here.
METHODS = {
    "dense": ("Dense", None),
    "static": ("StaticSparse", _make("StaticSparse")),
    "rigl": ("RigL", _make("RigL")),
    "srigl": ("SRigL (no ablation)", _make("SRigL", gamma_sal=0.0)),
    "srigl_abl": ("SRigL (ablation, γ_sal 0.3)", _make("SRigL", gamma_sal=0.3)),
    # Beyond the paper (issue 19): dead-end neurons ablated, no zero-gradient regrowth.
    "srigl_full": ("SRigL + dead ends + no zero-grad regrowth",
                   _make("SRigL", gamma_sal=0.3, ablate_dead_ends=True, skip_zero_grad=True)),
}


def _key(rec) -> tuple:
    return rec["method"], rec["sparsity"], rec["seed"]


def load_results(path: Path) -> list[dict]:
    """The records of a results file (one JSON object a line); the last of duplicates wins."""
    if not path.is_file():
        return []
    recs = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[_key(r)] = r
    return list(recs.values())


def run_one(dataset: str, method: str, sparsity: float, seed: int, epochs: int, datasets, save_dir=None) -> dict:
    """Train one model with the shared loop of ``sparse-compile train``; returns its JSON record."""
    from sparse_compile.train.loop import resolve_recipe, train

    label, factory = METHODS[method]
    recipe = resolve_recipe(RECIPES[dataset], epochs=epochs, sparsity=sparsity if factory else 0.0,
                            method="dense" if factory is None else "srigl")
    c0, t0 = time.process_time(), time.perf_counter()
    res = train(recipe, datasets=datasets, seed=seed, workers=0, progress=False, log=lambda *a, **k: None,
                sparsifier_factory=(lambda *a: None) if factory is None else factory)
    rec = dict(dataset=dataset, method=method, label=label, sparsity=sparsity if factory else 0.0, seed=seed,
               epochs=epochs, test_accuracy=res["test_accuracy"], cpu_s=time.process_time() - c0,
               wall_s=time.perf_counter() - t0, history=[h["test_accuracy"] for h in res["history"]])
    sp = res["sparsifier"]
    if sp is not None:
        rep = sp.report()
        rec["final_sparsity"] = rep.sparsity
        rec["layers"] = [dict(name=l.name, shape=list(l.shape), out=int(l.shape[0]), active=l.active,
                              ablated=l.ablated, budget=l.budget, nnz=l.nnz, fan_in_max=l.fan_in_max,
                              fan_in_min=l.fan_in_min, head=l.head, dense=l.dense) for l in rep.layers]
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        name = f"{dataset}_{method}" + (f"_{sparsity:g}" if factory else "") + f"_seed{seed}.pt"
        torch.save({k: v for k, v in res["model"].state_dict().items() if not k.endswith("_mask")}, save_dir / name)
    return rec


def grid(dataset: str, methods, sparsities, seeds) -> list[tuple]:
    """(method, sparsity, seed) in run order: dense for every seed, then sparsity by sparsity from the
    highest (where the methods separate), each seed's methods together: a cut-short grid leaves
    complete cells (every method, the same seeds) at the sparsities that matter most."""
    cells = [(m, 0.0, seed) for seed in seeds for m in methods if METHODS[m][1] is None]
    for s in sorted(sparsities, reverse=True):
        for seed in seeds:
            cells.extend((m, s, seed) for m in methods if METHODS[m][1] is not None)
    return cells


# ------------------------------------------------------------------------------------------------ report

def _ms(vals):
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def summarize(recs: list[dict]) -> dict:
    """Mean / std per (method, sparsity), SRigL widths at the highest sparsity and the rounding loss."""
    cells: dict = {}
    for r in recs:
        cells.setdefault((r["method"], r["sparsity"]), []).append(r)
    table = []
    for (m, s), rs in sorted(cells.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        mean, std = _ms([100 * r["test_accuracy"] for r in rs])
        table.append(dict(method=m, label=METHODS[m][0], sparsity=s, n=len(rs), mean=mean, std=std,
                          seeds=sorted(r["seed"] for r in rs), accs=[100 * r["test_accuracy"] for r in rs],
                          cpu_s=statistics.fmean(r["cpu_s"] for r in rs)))
    widths, loss = {}, {}
    for m in ("srigl_abl", "srigl"):
        for s in sorted({r["sparsity"] for r in recs if r["method"] == m}):
            rs = [r for r in recs if r["method"] == m and r["sparsity"] == s and "layers" in r]
            if not rs:
                continue
            per = {}
            for r in rs:
                for l in r["layers"]:
                    if l["dense"]:
                        continue
                    d = per.setdefault(l["name"], dict(out=l["out"], active=[], budget=[], nnz=[], k=[]))
                    d["active"].append(l["active"])
                    d["budget"].append(l["budget"])
                    d["nnz"].append(l["nnz"])
                    d["k"].append(l["fan_in_max"])
            widths[f"{m}@{s:g}"] = {n: dict(out=d["out"], active_mean=statistics.fmean(d["active"]),
                                            active=d["active"], k=d["k"]) for n, d in per.items()}
            loss[f"{m}@{s:g}"] = {n: dict(budget=d["budget"][0], lost_mean=statistics.fmean(
                b - z for b, z in zip(d["budget"], d["nnz"])), lost_frac_mean=statistics.fmean(
                (b - z) / b for b, z in zip(d["budget"], d["nnz"]))) for n, d in per.items()}
    return dict(table=table, widths=widths, rounding_loss=loss, budgets=budgets(recs),
                cpu_s_total=sum(r["cpu_s"] for r in recs), runs=len(recs))


def budgets(recs: list[dict]) -> dict:
    """Per sparsity and layer: RigL's weight budget (``round(density * numel)``), SRigL's (constant
    fan-in: ``k * neurons``), and the weights SRigL with ablation holds at the end (``k' * active``,
    mean over seeds), so the README can say what the two roundings cost against RigL."""
    out = {}
    for s in sorted({r["sparsity"] for r in recs if r["sparsity"] > 0}):
        pick = lambda m: [r for r in recs if r["method"] == m and r["sparsity"] == s and "layers" in r]  # noqa: E731
        rigl, srigl, abl = pick("rigl"), pick("srigl"), pick("srigl_abl")
        if not (rigl and (srigl or abl)):
            continue
        rows = {}
        for lay in rigl[0]["layers"]:
            if lay["dense"]:
                continue
            n = lay["name"]
            row = dict(numel=int(math.prod(lay["shape"])), rigl_budget=lay["budget"])
            for key, rs in (("srigl_budget", srigl or abl), ):
                row[key] = next(l["budget"] for l in rs[0]["layers"] if l["name"] == n)
            if abl:
                row["abl_nnz_mean"] = statistics.fmean(next(l["nnz"] for l in r["layers"] if l["name"] == n) for r in abl)
                row["abl_lost_vs_rigl_pct"] = 100 * (1 - row["abl_nnz_mean"] / row["rigl_budget"])
            rows[n] = row
        out[f"{s:g}"] = rows
    return out


def markdown(dataset: str, summ: dict) -> str:
    """The summary as markdown: accuracy table, Fig. 11 widths, rounding loss."""
    sps = sorted({t["sparsity"] for t in summ["table"] if t["sparsity"] > 0})
    by = {(t["method"], t["sparsity"]): t for t in summ["table"]}
    fmt = lambda t: "—" if t is None else (f"{t['mean']:.2f} ± {t['std']:.2f} (n={t['n']})"  # noqa: E731
                                           if t["n"] > 1 else f"{t['mean']:.2f} (n=1)")
    lines = [f"### {dataset}: test accuracy (%), mean ± sample std over seeds", "",
             "| method | " + " | ".join(f"{100 * s:g}%" for s in sps) + " |", "|---" * (len(sps) + 1) + "|"]
    for m, (label, fac) in METHODS.items():
        if fac is None:
            if (m, 0.0) in by:
                lines.append(f"| {label} (0%) | " + " | ".join(fmt(by[(m, 0.0)]) for _ in sps) + " |")
        elif any((m, s) in by for s in sps):
            lines.append(f"| {label} | " + " | ".join(fmt(by.get((m, s))) for s in sps) + " |")
    lines += ["", f"{summ['runs']} runs, {summ['cpu_s_total'] / 60:.1f} CPU-minutes in all."]
    for key, per in summ["widths"].items():
        if not key.startswith("srigl_abl@") or float(key.split("@")[1]) != max(sps, default=0):
            continue
        lines += ["", f"Final active neurons per layer, {key} (the paper's Fig. 11; per seed):", "",
                  "| layer | neurons | active (per seed) | mean % active | fan-in k (per seed) |", "|---|---|---|---|---|"]
        for n, d in per.items():
            lines.append(f"| {n} | {d['out']} | {', '.join(map(str, d['active']))} | "
                         f"{100 * d['active_mean'] / d['out']:.1f}% | {', '.join(map(str, d['k']))} |")
    if summ["budgets"]:
        lines += ["", "Weight budget per layer: RigL's `round(density * numel)`, SRigL's constant fan-in `k * neurons`, "
                      "and what SRigL with ablation holds at the end, `k' * active` with "
                      "`k' = floor(budget / active)` (mean over seeds), with its shortfall against RigL:", "",
                  "| sparsity | layer | weights | RigL budget | SRigL budget | SRigL-abl. final | short of RigL |",
                  "|---|---|---|---|---|---|---|"]
        for s, rows in summ["budgets"].items():
            for n, row in rows.items():
                tail = (f"{row['abl_nnz_mean']:.1f} | {row['abl_lost_vs_rigl_pct']:.2f}%" if "abl_nnz_mean" in row
                        else "— | —")
                lines.append(f"| {100 * float(s):g}% | {n} | {row['numel']:,} | {row['rigl_budget']} | "
                             f"{row['srigl_budget']} | {tail} |")
    return "\n".join(lines) + "\n"


def plot(dataset: str, summ: dict, path: Path) -> None:
    """Accuracy vs sparsity with one error-bar line per sparse method and the dense mean as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = dict(static="s", rigl="o", srigl="^", srigl_abl="D")
    for m, (label, fac) in METHODS.items():
        rows = [t for t in summ["table"] if t["method"] == m]
        if not rows:
            continue
        if fac is None:
            t = rows[0]
            ax.axhline(t["mean"], color="k", ls="--", lw=1, label=f"{label}")
            if t["n"] > 1:
                ax.axhspan(t["mean"] - t["std"], t["mean"] + t["std"], color="k", alpha=0.1)
            continue
        xs = [100 * t["sparsity"] for t in rows]
        ys = [t["mean"] for t in rows]
        es = [0 if math.isnan(t["std"]) else t["std"] for t in rows]
        ax.errorbar(xs, ys, yerr=es, marker=markers.get(m, "x"), capsize=3, label=label)
    sps = sorted({100 * t["sparsity"] for t in summ["table"] if t["sparsity"] > 0})
    ax.set_xticks(sps)
    ax.set_xticklabels([f"{s:g}" for s in sps])
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{ {'mnist': 'LeNet-300-100 on MNIST', 'fashion-mnist': 'small CNN on Fashion-MNIST'}.get(dataset, dataset)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_widths(dataset: str, summ: dict, path: Path) -> bool:
    """The paper's Fig. 11: % of neurons still active per layer after SRigL (ablation), one bar per
    sparsity (mean over seeds). Returns False when there is nothing to plot."""
    keys = sorted((k for k in summ["widths"] if k.startswith("srigl_abl@")), key=lambda k: float(k.split("@")[1]))
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summ["widths"][keys[0]])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
        per = summ["widths"][k]
        ax.bar([j + i * w for j in range(len(names))],
               [100 * per[n]["active_mean"] / per[n]["out"] if n in per else 0 for n in names], w,
               label=f"{100 * float(k.split('@')[1]):g}% sparse")
    ax.set_xticks([j + w * (len(keys) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names)
    ax.set_ylabel("active neurons (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"SRigL (γ_sal 0.3) final widths, {dataset}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def report(dataset: str, out: Path) -> str:
    """Write ``<dataset>.md``, ``.png`` and ``_summary.json`` from the results so far; returns the markdown."""
    recs = load_results(out / f"{dataset}.jsonl")
    if not recs:
        return f"{dataset}: no results in {out}\n"
    summ = summarize(recs)
    (out / f"{dataset}_summary.json").write_text(json.dumps(summ, indent=1))
    md = markdown(dataset, summ)
    (out / f"{dataset}.md").write_text(md)
    plot(dataset, summ, out / f"{dataset}.png")
    plot_widths(dataset, summ, out / f"{dataset}_widths.png")
    return md


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    """Run the grid (skipping finished runs), then write the reports."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, help=f"epochs of every run (default {EPOCHS})")
    p.add_argument("--quick", action="store_true", help="1 epoch, sparsities 0.9 0.99, seeds 0 1 (a few minutes)")
    p.add_argument("--out", type=Path, help=f"results folder (default {OUT}, {OUT}_quick with --quick)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in OUT")
    p.add_argument("--report-only", action="store_true", help="only write the reports from earlier results")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.quick:
        a.epochs = a.epochs or 1
        a.sparsities, a.seeds = [0.9, 0.99], [0, 1]
    out = a.out or (OUT.with_name(OUT.name + "_quick") if a.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    for ds in a.dataset:
        path = out / f"{ds}.jsonl"
        if a.fresh and path.exists():
            path.unlink()
        if not a.report_only:
            from sparse_compile.train.data import build_datasets

            epochs = a.epochs or EPOCHS[ds]
            done = {_key(r) for r in load_results(path) if r["epochs"] == epochs}
            todo = [c for c in grid(ds, a.methods, a.sparsities, a.seeds) if c not in done]
            print(f"{ds}: {len(todo)} runs to do ({len(done)} done), {epochs} epochs", file=sys.stderr, flush=True)
            data = build_datasets(ds) if todo else None
            for i, (m, s, seed) in enumerate(todo):
                save = out / "models" if (seed == a.seeds[0] and m in ("dense", "srigl_abl")) else None
                rec = run_one(ds, m, s, seed, epochs, data, save)
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"  [{i + 1}/{len(todo)}] {ds} {m} {s:g} seed {seed}: {100 * rec['test_accuracy']:.2f}% "
                      f"({rec['wall_s']:.0f} s, {rec['cpu_s']:.0f} CPU-s)", file=sys.stderr, flush=True)
                if (i + 1) % 5 == 0:
                    report(ds, out)
        print(report(ds, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
