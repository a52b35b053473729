"""``make bench``: a quick CPU subset of the layer benchmark, under 5 minutes, with a progress bar.

    python -m bench.quick [--out bench/out]

What it runs (ViT-B/16 fc2, 768x3072, random constant fan-in weights, 10% of neurons ablated, fp32):

* eager, every CPU form: sparsity 50/80/90/95/99%, batch 1, 8 and 64, 1 thread and all cores;
* torch.compile(mode="max-autotune"): sparsity 90%, batch 1 and 8, 1 thread (compiling every
  configuration is what makes the full run long).

Writes ``bench/out/quick-cpu-<date>.json`` / ``.csv``, prints the markdown tables and, when
matplotlib is installed, the PNG plots. The full grid: ``python -m bench.layer`` (see its --help).
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

from sparse_compile.benchmark import (
    LayerBenchConfig,
    add_speedups,
    markdown_table,
    run_layer_bench,
    write_results,
)

FORMS = ("dense", "ablated_dense", "structured_only", "condensed", "csr", "deepsparse")


def configs(min_run_time: float = 0.1) -> list:
    """The two configurations the quick run is made of (eager grid, compiled point)."""
    return [
        LayerBenchConfig(layers=("768x3072",), sparsities=(0.5, 0.8, 0.9, 0.95, 0.99), batches=(1, 8, 64),
                         forms=FORMS, compile="none", min_run_time=min_run_time),
        LayerBenchConfig(layers=("768x3072",), sparsities=(0.9,), batches=(1, 8), threads=(1,),
                         forms=FORMS[:-1], compile="max-autotune", min_run_time=min_run_time),
    ]


def main(argv=None) -> int:
    """Run the quick subset, write JSON + CSV (+ PNGs), print the tables."""
    p = argparse.ArgumentParser(prog="python -m bench.quick", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds of timed calls per configuration")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    eager, compiled = (run_layer_bench(c) for c in configs(args.min_run_time))
    rows = [r for r in eager["rows"]] + [r for r in compiled["rows"] if r["compiled"]]
    add_speedups(rows)
    meta = dict(eager["meta"], benchmark="layer", wall_s=round(time.perf_counter() - t0, 1),
                config={"eager": eager["meta"]["config"], "compiled": compiled["meta"]["config"]},
                command="python -m bench.quick " + " ".join(argv if argv is not None else sys.argv[1:]))
    result = {"meta": meta, "rows": rows}
    name = f"quick-cpu-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    jpath, cpath = write_results(args.out, name, meta, rows)
    m = meta["machine"]
    print(f"# {m['cpu_model']} ({m['cpu_count']} cores), torch {m['torch']}, {m['date']}; "
          f"condensed: {m['condensed_impl']}\n")
    print("## eager\n")
    print(markdown_table(result, compiled=False))
    print("## torch.compile(mode='max-autotune'), 90%, 1 thread\n")
    print(markdown_table(result, compiled=True))
    for f, note in sorted({(r["form"], r["note"]) for r in rows if r["status"] in ("skipped", "error", "wrong")}):
        print(f"- {f}: {note}")
    print(f"\nwrote {jpath} and {cpath} in {meta['wall_s']} s")
    try:
        from bench.plot import plot_layer_results

        for png in plot_layer_results(result, args.out, prefix=name):
            print(f"plot: {png}")
    except ImportError as e:
        print(f"no plots: {e} (pip install matplotlib)")
    return 1 if any(r["status"] == "wrong" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
