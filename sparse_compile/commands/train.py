"""``sparse-compile train``: train a model of the zoo with SRigL (or RigL / static / dense) from a recipe.

The loop itself is :func:`sparse_compile.train.loop.train` (the demo reuses it); this module only
parses the command line and prints the result.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ._common import parse_key_values

EPILOG = """examples:
    sparse-compile train --recipe digits_mlp --out runs/digits
    sparse-compile train --recipe resnet18_cifar10 --data ~/data --sparsity 0.95 --out runs/r18
    sparse-compile train --recipe resnet18_cifar10 --data ~/data --out runs/r18 --resume

Several processes (GPUs with NCCL, or CPU processes with gloo) through torchrun and
DistributedDataParallel; each process reads its own shard of the training set, the sparsifier keeps
the masks identical on every rank (checked at the end: ranks_consistent in report.json):

    torchrun --nproc_per_node 4 -m sparse_compile.cli train --recipe resnet50_imagenet \\
        --data /data/imagenet --device cuda --out runs/r50

--batch-size (and the recipe's batch_size) is per process. The output folder holds checkpoint.pt
(written after every epoch, what --resume reads), model.safetensors (final weights with their
*.weight_mask buffers: sparse-compile inspect / optimize read it) and report.json (recipe, per-epoch
history, the sparsifier's report, the inspect table).
"""


def register(sub) -> None:
    """Add the ``train`` subcommand."""
    from sparse_compile.models.recipes import METHODS, list_recipes

    import argparse

    p = sub.add_parser(
        "train", help="train a model with SRigL / RigL / static / dense from one of the paper's recipes",
        description="Train a model of the zoo with SRigL (or RigL / static / dense) from one of the paper's "
                    "recipes: " + ", ".join(list_recipes()) + ".",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", help="recipe name (optional with --resume: the checkpoint holds it)")
    p.add_argument("--data", help="data root (CIFAR-10 pickle folder, ImageNet ImageFolder); not for digits; "
                        "MNIST / Fashion-MNIST default to their installed packages (make data)")
    p.add_argument("--sparsity", type=float, help="global sparsity of the sparse layers (recipe: 0.9)")
    p.add_argument("--epochs", type=int, help="number of epochs (overrides the recipe)")
    p.add_argument("--method", choices=METHODS, help="sparse training method (recipe: srigl)")
    p.add_argument("--batch-size", type=int, help="per-process batch size (overrides the recipe)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="argument of the recipe's model builder (VALUE parsed as JSON when possible), e.g. "
                        "--model-arg hidden=[1024,1024] for digits_mlp's MLP; recorded in model.safetensors, "
                        "so optimize rebuilds the same model (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set lr=0.05 --set lr_milestones=30,60 (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of initialisation, masks and data order (default 0, or the checkpoint's with --resume)")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader worker processes (default: 0 for the in-memory digits / MNIST / Fashion-MNIST sets, else one per spare CPU core, at most 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: 1 for models under 1M parameters on the CPU, "
                        "else one per core)")
    p.add_argument("--out", help="output folder (checkpoint.pt, model.safetensors, report.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help="end this invocation after N more epochs (continue later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    """Resolve the recipe, train, print the final inspect table."""
    from sparse_compile.models.recipes import Recipe
    from sparse_compile.train.distributed import end_worker
    from sparse_compile.train.loop import _dist, resolve_recipe, train

    base, seed = args.recipe, args.seed
    ckpt = Path(args.out) / "checkpoint.pt" if args.out else None
    if args.resume and ckpt is not None and ckpt.is_file():
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated / foreign file
            raise ValueError(f"--resume: {ckpt} is not a readable training checkpoint ({type(e).__name__})") from None
        seed = saved["seed"] if seed is None else seed
        base = Recipe.from_dict(saved["recipe"]) if base is None else base
    if base is None:
        raise ValueError("--recipe is required (optional only with --resume --out DIR holding a checkpoint)")
    seed = 0 if seed is None else seed
    recipe = resolve_recipe(base, sparsity=args.sparsity, epochs=args.epochs, method=args.method,
                            batch_size=args.batch_size, overrides=args.set)
    model_args = parse_key_values(args.model_arg, "--model-arg")
    if args.resume and not args.model_arg and ckpt is not None and ckpt.is_file():
        model_args = saved.get("model_args", {})
    if args.print_recipe:
        print(recipe)
        return 0
    if not args.out:
        raise ValueError("--out DIR is required")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; --out names the run's folder")
    if args.device != "auto":
        from ._common import parse_device

        parse_device(args.device)
    rank = _dist()[0]
    if rank == 0:
        print(f"recipe {recipe.name} ({recipe.source}): {recipe.model} on {recipe.dataset}, {recipe.method} at "
              f"sparsity {recipe.sparsity}, {recipe.epochs} epochs")
    res = train(recipe, data=args.data, out=args.out, device=args.device, resume=args.resume, seed=seed,
                workers=args.workers, threads=args.threads, progress=not args.no_progress,
                stop_after=args.stop_after_epochs, model_kwargs=model_args)
    if rank == 0:
        print(res["inspect"])
        print(f"test accuracy {res['test_accuracy']:.4f}; wrote {Path(args.out) / 'model.safetensors'} and "
              f"{Path(args.out) / 'report.json'}")
    # Under torchrun: leave together and skip the process teardown gloo can abort in (see end_worker).
    end_worker(0)
    return 0
