"""Reading state dicts from disk (safetensors or torch files) and the shipped example checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

EXAMPLE = "mlp_digits_srigl90.safetensors"


def example_path() -> Path:
    """Path of the small SRigL-trained MLP checkpoint shipped with the package."""
    return Path(__file__).parent / "examples" / EXAMPLE


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def is_saved_model(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a model file written by :func:`sparse_compile.save` (a ``.sc`` file)."""
    from .compiler.serialize import META_KEY

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def load_state_dict(path: Union[str, Path]) -> dict:
    """Load a state dict from ``.safetensors`` or a torch file (tensors only, no pickled code).

    A torch file holding ``{"model": state_dict, ...}`` (our training checkpoints) yields the inner
    state dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors' own error types for a bad header / body
            raise ValueError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch's zip format / legacy pickle
        raise ValueError(f"{path} is not a checkpoint: neither safetensors nor a torch file "
                         f"(it starts with {magic!r})")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        first = _first_line(e).split(". ")[0]
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return obj
