"""Reading trained checkpoints: state dicts on disk (safetensors or torch files), the model a
checkpoint records, loading one into a model with its masks, and the shipped example checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

EXAMPLE = "mlp_digits_srigl90.safetensors"
MASK_SUFFIX = ".weight_mask"

__all__ = ["load_checkpoint", "load_state_dict", "checkpoint_metadata", "example_path"]


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


def checkpoint_metadata(path: Union[str, Path]) -> dict:
    """What a checkpoint says about itself: ``{"model", "recipe", "method", "image_size", ...}`` (strings
    or numbers; empty when it records nothing).

    ``sparse-compile train`` records them in ``model.safetensors``'s metadata and in
    ``checkpoint.pt``'s recipe; ``sparse-compile optimize`` reads ``model`` from here when ``--model``
    is not given.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        for k in ("image_size", "num_classes"):
            if k in meta:
                try:
                    meta[k] = json.loads(meta[k])
                except ValueError:
                    pass
        return meta
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    recipe = obj.get("recipe") if isinstance(obj, dict) else None
    if not isinstance(recipe, dict):
        return {}
    return {k: v for k, v in (("model", recipe.get("model")), ("recipe", recipe.get("name")),
                              ("method", recipe.get("method")), ("image_size", recipe.get("image_size")),
                              ("num_classes", recipe.get("num_classes"))) if v is not None}


def load_checkpoint(model: nn.Module, checkpoint: Union[str, Path, Mapping[str, torch.Tensor]],
                    strict: bool = True) -> nn.Module:
    """Load a trained sparse checkpoint into ``model`` (in place), masks included; returns ``model``.

    ``checkpoint`` is a path (``.safetensors``, or a torch file holding a state dict or our training
    checkpoint ``{"model": state_dict, ...}``) or a state dict. Every ``<layer>.weight_mask`` entry
    becomes a bool ``weight_mask`` buffer on that layer before the weights are loaded: a plain
    ``model.load_state_dict(state)`` fails on those keys, and ``strict=False`` silently drops them,
    after which the model looks dense to :func:`sparse_compile.inspect` and ``optimize``.

    With ``strict=True`` (default) a missing or unexpected key is a ``ValueError`` naming the first
    few. Typical use::

        model = sparse_compile.models.create_model("resnet18_cifar")
        sparse_compile.load_checkpoint(model, "runs/r18/model.safetensors")
        opt = sparse_compile.optimize(model.eval(), example_inputs=(x,))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    where = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "state dict"
    state = load_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"load_checkpoint: {where}: entries that are not tensors: {bad[:5]}")
    for key, t in state.items():
        if not key.endswith(MASK_SUFFIX):
            continue
        name = key[: -len(MASK_SUFFIX)]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_checkpoint: {where}: mask {key!r} names no layer {name!r} of "
                             f"{type(model).__name__}; is it a checkpoint of this model?") from None
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) != tuple(t.shape):
            raise ValueError(f"load_checkpoint: {where}: mask {key!r} has shape {tuple(t.shape)}, layer {name!r}'s "
                             f"weight {tuple(w.shape)}")
        device = w.device if isinstance(w, torch.Tensor) else t.device
        # register_buffer replaces an existing buffer of that name (e.g. from a sparsifier).
        mod.register_buffer("weight_mask", t.to(device=device, dtype=torch.bool).clone())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        def few(keys):
            keys = sorted(keys)
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = ([f"missing {few(missing)}"] if missing else []) + ([f"unexpected {few(unexpected)}"] if unexpected else [])
        raise ValueError(f"load_checkpoint: {where} does not fit {type(model).__name__}: {'; '.join(parts)} "
                         "(strict=False loads what fits)")
    return model

