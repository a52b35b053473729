"""``sparse-compile bench layer ...``: time one sparse layer in every form on this machine.

The same benchmark as ``python -m bench.layer`` in the repository (both call
:mod:`sparse_compile.benchmark`); whole-model and plotting scripts live under ``bench/``.
"""
from __future__ import annotations


def register(sub) -> None:
    """Add the ``bench`` subcommand and its ``layer`` benchmark."""
    from ..benchmark import add_layer_arguments

    p = sub.add_parser("bench", help="benchmarks: one sparse layer in every form (dense, condensed, CSR...)")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    lp = kinds.add_parser(
        "layer",
        help="one Linear layer: dense, ablated-dense, structured-only, condensed, CSR, 2:4, DeepSparse; eager and compiled",
        description="Time one sparse Linear layer in every form; write JSON + CSV and print a markdown table. "
                    "Default: ViT-B/16 MLP layers at 50-99% sparsity (a long run: pick a subset for a quick look, "
                    "e.g. --layers 768x3072 --sparsities 0.9 --batches 1 8).",
    )
    add_layer_arguments(lp)
    lp.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    """Run the layer benchmark with the parsed options."""
    from ..benchmark import run_layer_args

    return run_layer_args(args)
