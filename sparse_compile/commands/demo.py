"""``sparse-compile demo``: the end-to-end demo on the bundled digits data (what ``make demo`` runs)."""
from __future__ import annotations


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo", help="train dense / RigL / SRigL on digits, optimize, time a ViT layer, write plots",
        description="Train a 64-1024-1024-10 MLP on scikit-learn's digits dense, with RigL and with SRigL at 90% "
                    "sparsity (6 epochs each); inspect the SRigL model and optimize it (mode auto, batch 1, this "
                    "CPU), printing its measured whole-model speedup beside its accuracy; time a 90%-sparse "
                    "ViT-B/16 MLP layer (dense, CSR, condensed) at batch 1; write report.json and PNG plots. "
                    "Every number is measured in the run.",
    )
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs per model (default 6)")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024], metavar="WIDTH",
                   help="hidden layer widths of the MLP (default: 1024 1024; the digits_mlp recipe's 300 100 is "
                        "too small for a sparse form to beat dense at batch 1)")
    p.add_argument("--sparsity", type=float, default=0.9, help="sparsity of the RigL / SRigL models (default 0.9)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds for the layer (default 15)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the whole demo (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run the demo."""
    import sys

    from ..demo import run_demo

    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        print(f"sparse-compile demo: error: {e.name} is missing; install the demo extras: "
              "pip install 'sparse_compile[demo]'", file=sys.stderr)
        return 1
    if args.threads < 1 or args.rounds < 1 or args.epochs < 1 or min(args.hidden) < 1:
        raise ValueError("--threads, --rounds, --epochs and --hidden must be >= 1")
    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; --out names the demo's output folder")
    run_demo(out=args.out, epochs=args.epochs, sparsity=args.sparsity, rounds=args.rounds, threads=args.threads,
             seed=args.seed, progress=not args.no_progress, hidden=args.hidden)
    return 0
