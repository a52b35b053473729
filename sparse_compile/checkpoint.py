"""Reading state dicts from disk (safetensors or torch files) and the shipped example checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

EXAMPLE = "mlp_digits_srigl90.safetensors"


def example_path() -> Path:
    """Path of the small SRigL-trained MLP checkpoint shipped with the package."""
    return Path(__file__).parent / "examples" / EXAMPLE


def load_state_dict(path: Union[str, Path]) -> dict:
    """Load a state dict from ``.safetensors`` or a torch file (tensors only, no pickled code).

    A torch file holding ``{"model": state_dict, ...}`` (our training checkpoints) yields the inner
    state dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return obj
