"""``sparse-compile flops --model resnet50 [--sparsity 0.8 0.9 0.95 0.99]``: inference and training
multiply-adds (Appendix G), of a checkpoint or of random constant fan-in masks at given sparsities."""
from __future__ import annotations

import json
from pathlib import Path

from ..train.budgets import DISTRIBUTIONS

# Appendix D.2, ResNet-50 on ImageNet: 256,000 steps of batch 512, delta_t = 800, dense gradients
# averaged over 8 mini-batches, topology frozen after 75% of training.
PAPER_STEPS, PAPER_DELTA_T, PAPER_ACCUM, PAPER_T_END = 256_000, 800, 8, 0.75


def register(sub) -> None:
    """Add the ``flops`` subcommand."""
    p = sub.add_parser("flops", help="multiply-adds of a sparse model: dense, masked, condensed, ablated-dense, training")
    p.add_argument("--model", required=True, help="registered model name (see sparse_compile.models.list_models())")
    p.add_argument("--checkpoint", help="state dict with <layer>.weight_mask buffers; default: random masks")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99],
                   help="global sparsities of the random constant fan-in masks (default 0.8 0.9 0.95 0.99)")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="erk", help="layer-wise sparsity (default erk)")
    p.add_argument("--dense-first", action="store_true",
                   help="keep the first Linear/Conv2d dense (RigL's setting at 99%%; off in SRigL's reference code)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the counted forward pass (default 1)")
    p.add_argument("--total-steps", type=int, default=PAPER_STEPS, help=f"training steps (default {PAPER_STEPS})")
    p.add_argument("--delta-t", type=int, default=PAPER_DELTA_T, help=f"steps between updates (default {PAPER_DELTA_T})")
    p.add_argument("--grad-accumulation", type=int, default=PAPER_ACCUM,
                   help=f"mini-batches of dense gradient per update (default {PAPER_ACCUM})")
    p.add_argument("--t-end", type=float, default=PAPER_T_END, help=f"fraction of training with updates (default {PAPER_T_END})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    p.add_argument("--per-layer", action="store_true", help="also print the per-layer table of each row")
    p.add_argument("--json", metavar="OUT", help="write every row (with per-layer counts) here")
    p.set_defaults(func=run)


def sparse_layers(model):
    """``{name: module}`` of the Linear/Conv2d layers whose weights get a mask, in module order."""
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def apply_random_masks(model, sparsity: float, distribution: str = "erk", dense_first: bool = False, seed: int = 0):
    """Register random constant fan-in ``weight_mask`` buffers on every Linear/Conv2d of ``model``,
    with per-layer densities from :func:`sparse_compile.train.budgets.layer_densities` (the trainer's own
    budgets). Returns ``(densities, achieved global sparsity)``."""
    import torch

    from ..benchmark.weights import srigl_like_mask
    from ..train.budgets import achieved_sparsity, layer_budgets, layer_densities

    layers = sparse_layers(model)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    dense = [next(iter(layers))] if dense_first else []
    dens = layer_densities(shapes, sparsity, distribution=distribution, dense=dense)
    budgets = layer_budgets(shapes, dens)
    g = torch.Generator().manual_seed(seed)
    for n, m in layers.items():
        mask = srigl_like_mask(shapes[n], budgets[n], generator=g).to(m.weight.device)
        m.register_buffer("weight_mask", mask)  # replaces a mask the model already has
    return dens, achieved_sparsity(shapes, dens)


def _load_checkpoint(model, path) -> float:
    """Load a checkpoint (masks included) into ``model``; returns the global sparsity of its masks."""
    from ..checkpoint import load_checkpoint
    from ..formats import analyze, get_mask

    load_checkpoint(model, path)
    infos = [analyze(m.weight, get_mask(m), n) for n, m in sparse_layers(model).items()]
    return 1.0 - sum(i.nnz for i in infos) / sum(i.numel for i in infos)


def run(args) -> int:
    """Print the FLOPs table (and per-layer tables on request)."""
    from ..analysis.flops import flops, training_flops
    from ..models import create_model, input_shape

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for s in args.sparsity:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"--sparsity values must be in [0, 1), got {s}")
    shape = (args.batch_size, *input_shape(args.model))
    rows = []
    settings = [("checkpoint", None)] if args.checkpoint else [("random", s) for s in args.sparsity]
    for how, s in settings:
        model = create_model(args.model)
        if how == "checkpoint":
            achieved = _load_checkpoint(model, args.checkpoint)
        else:
            _, achieved = apply_random_masks(model, s, args.distribution, args.dense_first, args.seed)
        rep = flops(model, shape)
        tr = training_flops(rep.masked, rep.dense, total_steps=args.total_steps, delta_t=args.delta_t,
                            grad_accumulation=args.grad_accumulation, t_end=args.t_end)
        rows.append({"sparsity": s, "achieved_sparsity": achieved, "flops": rep.to_dict(), "training": tr.to_dict()})
        if args.per_layer:
            print(rep, "\n")
    what = args.checkpoint or (f"random constant fan-in masks, {args.distribution.upper()}"
                               + (", first layer dense" if args.dense_first else ""))
    print(f"{args.model}, input {shape}, {what}; multiply-adds per forward pass; training: "
          f"{args.total_steps} steps, delta_t {args.delta_t}, grad accumulation {args.grad_accumulation}, t_end {args.t_end}")
    head = ("sparsity", "achieved", "dense G", "masked G", "masked x", "condensed x", "abl-dense x", "training x")
    print("  ".join(f"{h:>11s}" for h in head))
    for r in rows:
        f, d = r["flops"], r["flops"]["dense"]
        req = "-" if r["sparsity"] is None else f"{100 * r['sparsity']:.1f}%"
        cells = (req, f"{100 * r['achieved_sparsity']:.2f}%", f"{d / 1e9:.4f}", f"{f['masked'] / 1e9:.4f}",
                 f"{f['masked'] / d:.4f}", f"{f['condensed'] / d:.4f}", f"{f['ablated_dense'] / d:.4f}",
                 f"{r['training']['ratio']:.4f}")
        print("  ".join(f"{c:>11s}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "input_shape": list(shape), "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0
