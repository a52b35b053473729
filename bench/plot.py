"""PNG plots from layer-benchmark JSON, like the paper's Figs 18-21.

    python -m bench.plot bench/out/layer-cpu-20261127-161357.json [--out DIR]

One figure per (layer, device, dtype, threads): one panel per batch size, time against sparsity on a
log scale, one line per form (solid: eager, dashed: torch.compile), error bars from the quartiles
(q25 to q75) of the repeated measurements. Forms that did not run (skipped, wrong) are left out; the
figure title says which machine and versions the numbers come from.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparse_compile.benchmark import FORM_LABELS, FORMS, read_results

_COLORS = {
    "dense": "#222222",
    "ablated_dense": "#1f77b4",
    "structured_only": "#17becf",
    "condensed": "#d62728",
    "csr": "#2ca02c",
    "semi_structured": "#9467bd",
    "deepsparse": "#ff7f0e",
}


def _groups(rows):
    out: dict = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        out.setdefault((r["layer"], r["device"], r["dtype"], r["threads"]), []).append(r)
    return out


def plot_layer_results(result: dict, out_dir, prefix: str = "layer") -> list:
    """Write one PNG per (layer, device, dtype, threads) group of ``result``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["meta"].get("machine", {})
    where = m.get("gpu_name") or m.get("cpu_model") or "?"
    ver = f"torch {m.get('torch')}, triton {m.get('triton')}, {str(m.get('date', ''))[:10]}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (layer, device, dtype, threads), rows in sorted(_groups(result["rows"]).items(), key=str):
        batches = sorted({r["batch"] for r in rows})
        ncol = min(4, len(batches))
        nrow = -(-len(batches) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
        for ax in axes.flat[len(batches):]:
            ax.set_visible(False)
        for ax, batch in zip(axes.flat, batches):
            series: dict = {}
            for r in rows:
                if r["batch"] == batch:
                    series.setdefault((r["form"], bool(r["compiled"])), []).append(r)
            for (form, compiled), rs in sorted(series.items(), key=lambda kv: (kv[0][1], FORMS.index(kv[0][0]))):
                rs.sort(key=lambda r: r["sparsity"])
                xs = [100 * r["sparsity"] for r in rs]
                ys = [r["median_us"] for r in rs]
                err = [[r["median_us"] - r["q25_us"] for r in rs], [r["q75_us"] - r["median_us"] for r in rs]]
                ax.errorbar(xs, ys, yerr=err, color=_COLORS.get(form), linestyle="--" if compiled else "-",
                            marker="o", markersize=3, capsize=2, linewidth=1.2,
                            label=FORM_LABELS.get(form, form) + (" (compiled)" if compiled else ""))
            ax.set_yscale("log")
            ax.set_title(f"batch {batch}")
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("time (µs)")
            ax.grid(True, which="both", alpha=0.3)
        legend: dict = {}  # every series of every panel, once (some forms only run at some batches)
        for ax in axes.flat[: len(batches)]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
        labels, handles = list(legend), list(legend.values())
        th = f", {threads} thread{'s' if threads != 1 else ''}" if threads not in ("", None) else ""
        fig.suptitle(f"{layer} layer, {dtype}, {device}{th}: {where}\n{ver}", fontsize=10)
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 6), 1, 1))
        tname = f"-t{threads}" if threads not in ("", None) else ""
        path = out_dir / f"{prefix}-{layer}-{device}-{dtype}{tname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """Plot every group of one or more result JSON files."""
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="layer benchmark JSON files (bench/out/layer-*.json)")
    p.add_argument("--out", default=None, help="directory for the PNGs (default: next to each JSON)")
    args = p.parse_args(argv)
    for path in args.results:
        result = read_results(path)
        if result["meta"].get("benchmark") != "layer":
            print(f"{path}: not a layer benchmark; skipped", file=sys.stderr)
            continue
        for png in plot_layer_results(result, args.out or Path(path).parent, prefix=Path(path).stem):
            print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
