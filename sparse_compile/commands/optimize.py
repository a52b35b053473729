"""``sparse-compile optimize CHECKPOINT [--model NAME]``: rewrite a trained sparse model and save it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ._common import parse_key_values


def register(sub) -> None:
    """Add the ``optimize`` subcommand."""
    p = sub.add_parser(
        "optimize",
        help="rewrite a sparse checkpoint's layers into their fastest exact forms; print the per-layer table; save",
        description="Load CHECKPOINT into the registered model NAME (masks included), run sparse_compile.optimize "
                    "on inputs of the given batch size, print what was done per layer and save the result "
                    "(safetensors + JSON rebuild spec; load it with sparse_compile.load).",
    )
    p.add_argument("checkpoint", help="state dict (.safetensors or torch file) of the trained model, masks included")
    p.add_argument("--model", default=None,
                   help="registered model name (see sparse_compile.models.list_models()); default: the model the "
                        "checkpoint records (sparse-compile train records it)")
    p.add_argument("--mode", default="auto", help="auto, dense, ablated_dense, condensed or csr (default: auto; structured is the old name of ablated_dense)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the example input 'auto' times with")
    p.add_argument("--device", default="cpu", help="device the result runs on and is timed on (default: cpu)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: read from the head weight)")
    p.add_argument("--image-size", type=int, default=None, help="image size for models that take one (e.g. vit_b_16)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra builder argument (VALUE parsed as JSON when possible), repeatable")
    p.add_argument("--repeats", type=int, default=15, help="timing repeats per form in 'auto' (default: 15)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="run the optimized model in this dtype (bfloat16: bf16 values and activations, fp32 "
                        "accumulation in the condensed kernels; the error against fp32 is reported)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the autotune cache")
    p.add_argument("--no-whole-model-check", action="store_true",
                   help="in 'auto', keep the per-layer choices even if the whole model would run faster "
                        "with its original layers")
    p.add_argument("-o", "--output", default=None, help="output file (default: CHECKPOINT stem + '.sc.safetensors'); "
                                                       "never the checkpoint itself")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(func=run)


def _builder_kwargs(args) -> dict:
    kw = parse_key_values(args.model_arg, "--model-arg")
    if args.image_size is not None:
        kw["image_size"] = args.image_size
    return kw


def _head_name(model) -> str:
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise ValueError("model has no Linear or Conv2d layer")
    return names[-1]


def _create(name: str, kw: dict, **extra):
    """``create_model`` with a clear error for a builder argument the model does not take."""
    import inspect

    from sparse_compile.models import create_model

    try:
        return create_model(name, **extra, **kw)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).split("argument", 1)[1].strip(" '\"")
        try:
            from sparse_compile.models import model_spec

            params = sorted(p for p in inspect.signature(model_spec(name).builder).parameters
                            if p != "num_classes")
        except Exception:  # the listing is a courtesy; the error stands without it
            params = []
        known = f" (it takes: {', '.join(params)})" if params else ""
        raise ValueError(f"--model-arg {bad}: model {name!r} has no such argument{known}") from None


def build_model(name: str, state: dict, num_classes=None, **kw):
    """The registered model ``name`` with ``state`` loaded (masks included, see
    :func:`sparse_compile.load_checkpoint`), in eval mode.

    ``num_classes`` defaults to the head weight's output size in ``state``.
    """
    model = _create(name, kw)
    head = _head_name(model)
    w = state.get(f"{head}.weight")
    if w is None:
        raise ValueError(f"checkpoint has no '{head}.weight' (the head of {name!r}); is it a {name} checkpoint?")
    if num_classes is None:
        num_classes = int(w.shape[0])
    elif num_classes != int(w.shape[0]):
        raise ValueError(f"--num-classes {num_classes} does not fit the checkpoint: its head '{head}' has "
                         f"{int(w.shape[0])} outputs")
    model = _create(name, kw, num_classes=num_classes)
    from sparse_compile.checkpoint import load_checkpoint

    try:
        load_checkpoint(model, state)
    except ValueError as e:
        raise ValueError(f"checkpoint does not fit model {name!r}{kw and f' with {kw}' or ''}: {e}") from None
    return model.eval()


def _model_name(args) -> str:
    """--model, else the model the checkpoint records."""
    from sparse_compile.checkpoint import checkpoint_metadata

    meta = checkpoint_metadata(args.checkpoint)
    if args.model is not None:
        return args.model
    name = meta.get("model")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{args.checkpoint} does not record its model (checkpoints written by sparse-compile train "
                         "do); pass --model NAME (see sparse_compile.models.list_models())")
    if args.image_size is None and isinstance(meta.get("image_size"), int):
        args.image_size = meta["image_size"]
    recorded = ""
    if meta.get("model_args") and not args.model_arg:  # e.g. the MLP's hidden widths (train --model-arg)
        margs = json.loads(meta["model_args"]) if isinstance(meta["model_args"], str) else meta["model_args"]
        args.model_arg = [f"{k}={json.dumps(v)}" for k, v in margs.items()]
        recorded = f" with {', '.join(args.model_arg)}"
    print(f"model {name!r}{recorded} (recorded in the checkpoint)", file=sys.stderr)
    return name


def run(args) -> int:
    """Load, optimize, print the report, save."""
    import torch

    from ..checkpoint import is_saved_model, load_state_dict
    from ..models import input_shape
    from ._common import check_output_file, parse_device
    from ..compiler import MODES, optimize
    from ..compiler.config import DEPRECATED_NAMES
    from ..compiler.serialize import save

    if args.mode not in MODES and args.mode not in DEPRECATED_NAMES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    parse_device(args.device)
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    out = Path(args.output) if args.output else ckpt.parent / f"{ckpt.stem}.sc.safetensors"
    if out.is_dir() or out.resolve() == ckpt.resolve():
        check_output_file(out, inputs=(ckpt,), force=args.force)
    if is_saved_model(ckpt):
        raise ValueError(f"{ckpt} is already an optimized model (written by sparse_compile.save); "
                         "optimize takes the trained checkpoint")
    state = load_state_dict(ckpt)  # first: its errors say what is wrong with the file
    name = _model_name(args)
    kw = _builder_kwargs(args)
    model = build_model(name, state, args.num_classes, **kw)
    # Checked before the (long) optimize, and never the checkpoint itself.
    check_output_file(out, inputs=(ckpt,), force=args.force)
    shape = input_shape(name, **kw)
    x = torch.randn(args.batch_size, *shape)  # optimize moves it to --device (and names a missing CUDA)
    opt = optimize(model, (x,), mode=args.mode, device=args.device, repeats=args.repeats, cache=not args.no_cache,
                   whole_model_check=not args.no_whole_model_check, dtype=args.dtype)
    rep = opt.sparse_compile_report
    save(opt, out)
    if args.json:
        print(json.dumps({**rep.to_dict(), "output": str(out)}, indent=2))
    else:
        print(rep)
        print(f"saved {out} (load with sparse_compile.load)")
    return 0
