"""``sparse-compile bench layer`` / ``python -m bench.layer``: arguments in, tables and result files out."""
from __future__ import annotations

import argparse
import datetime as _dt
import sys

import torch

from .layer import _DTYPES, CPU_BATCHES, DEFAULT_LAYERS, DEFAULT_SPARSITIES, GPU_BATCHES, LayerBenchConfig, run_layer_bench
from .results import FORM_LABELS, FORMS, tables, write_results


def add_layer_arguments(p: argparse.ArgumentParser) -> None:
    """The layer benchmark's options (lists are space-separated: ``--batches 1 8``)."""
    p.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), metavar="OUTxIN",
                   help="weight shapes, out x in (default: ViT-B/16 fc2 768x3072 and fc1 3072x768)")
    p.add_argument("--sparsities", nargs="+", type=float, default=list(DEFAULT_SPARSITIES))
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help=f"default: CPU {' '.join(map(str, CPU_BATCHES))}; GPU {' '.join(map(str, GPU_BATCHES))}")
    p.add_argument("--threads", nargs="+", type=int, default=None, help="CPU thread counts (default: 1 and all cores)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(_DTYPES), help="default: CPU fp32; GPU fp32 bf16")
    p.add_argument("--forms", nargs="+", default=list(LayerBenchConfig.forms), choices=FORMS)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--compile", default=None, choices=["none", "default", "max-autotune"],
                   help="also time each form under torch.compile in this mode (default max-autotune; "
                        "'none' for eager only: on a GPU, max-autotune autotunes every GEMM shape, minutes per run)")
    p.add_argument("--ablated-fraction", type=float, default=0.1,
                   help="random weights: fraction of neurons ablated, as a trained SRigL layer has (default 0.1)")
    p.add_argument("--checkpoint", default=None, help="trained SRigL state dict (.safetensors / .pt): bench its layer")
    p.add_argument("--layer", dest="checkpoint_layer", default=None, help="layer name in --checkpoint (e.g. encoder.layers.11.mlp.3)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timed calls per configuration")
    p.add_argument("--quick", action="store_true", help="one short measurement per configuration (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out", help="directory for the JSON and CSV (default bench/out)")
    p.add_argument("--name", default=None, help="file name stem (default layer-<device>-<date>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> LayerBenchConfig:
    """A :class:`LayerBenchConfig` from parsed :func:`add_layer_arguments` options."""
    return LayerBenchConfig(
        layers=tuple(args.layers), sparsities=tuple(args.sparsities),
        batches=tuple(args.batches) if args.batches else None,
        threads=tuple(args.threads) if args.threads else None,
        dtypes=tuple(args.dtypes) if args.dtypes else None,
        forms=tuple(args.forms), device=args.device, compile=args.compile,
        ablated_fraction=args.ablated_fraction, checkpoint=args.checkpoint,
        checkpoint_layer=args.checkpoint_layer, quick=args.quick, min_run_time=args.min_run_time, seed=args.seed,
    )


def run_layer_args(args) -> int:
    """Run from parsed options: write JSON + CSV, print the table; exit code 1 if a form was wrong."""
    result = run_layer_bench(config_from_args(args), progress=not args.no_progress)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = args.name or f"layer-{torch.device(args.device).type}-{stamp}"
    jpath, cpath = write_results(args.out, name, result["meta"], result["rows"])
    m = result["meta"]["machine"]
    print(f"# {m['cpu_model'] if m['gpu_name'] is None else m['gpu_name']}, torch {m['torch']}, "
          f"triton {m['triton']}, {m['date']}; condensed: {m['condensed_impl']}")
    print(tables(result))
    skipped = {(r["form"], r["note"]) for r in result["rows"] if r["status"] in ("skipped", "error")}
    for f, note in sorted(skipped):
        print(f"- {FORM_LABELS[f]}: {note}")
    print(f"wrote {jpath} and {cpath}")
    bad = [r for r in result["rows"] if r["status"] == "wrong"]
    if bad:
        print(f"error: {len(bad)} configuration(s) gave outputs that do not match the dense reference", file=sys.stderr)
        return 1
    return 0


def layer_main(argv=None) -> int:
    """``python -m bench.layer`` entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__.split("\n\n")[0])
    add_layer_arguments(p)
    try:
        return run_layer_args(p.parse_args(argv))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"bench layer: error: {e}", file=sys.stderr)
        return 2
