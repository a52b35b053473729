"""``sparse-compile inspect CHECKPOINT_OR_MODEL_NAME``."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    """Add the ``inspect`` subcommand."""
    p = sub.add_parser("inspect", help="per-layer sparsity, fan-in and ablation of a checkpoint or model")
    p.add_argument("target", help="checkpoint file (.safetensors / .pt state dict), 'example', or a model name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def load_target(target: str):
    """A model or state dict for ``target``: a file path, the shipped 'example', or a registry name."""
    from ..checkpoint import load_state_dict, example_path

    if target == "example":
        return load_state_dict(example_path())
    path = Path(target)
    if path.exists():
        return load_state_dict(path)
    from sparse_compile.models import create_model, list_models

    if target in list_models():
        return create_model(target)
    raise FileNotFoundError(f"{target!r} is neither a file, 'example', nor a registered model name")


def run(args) -> int:
    """Print the inspect table (or JSON)."""
    from ..analysis.inspect import inspect

    rep = inspect(load_target(args.target))
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep)
    return 0
