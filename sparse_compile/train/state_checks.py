"""Validation of a sparsifier state dict before :meth:`SparseTrainer.load_state_dict` touches anything.

A checkpoint may be stale, edited or written by another version: every field is checked (types,
shapes, ranges, the mask against the layer's budget and the method's structure) and the first
problem raises a :class:`ValueError` naming the layer and the key, so a failed load leaves the
sparsifier and the model exactly as they were.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["validate_state"]

_LAYER_KEYS = ("mask", "ever", "dense_grad", "budget", "last_drop")


def _int(v) -> Optional[int]:
    """``v`` as an int if it is an integer (Python or 0-d integer tensor), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point() and v.dtype != torch.bool:
        return int(v)
    return None


def _check_layer(trainer, layer, s) -> None:
    where = f"{trainer.method}.load_state_dict: layer {layer.name!r}"
    if not isinstance(s, dict):
        raise ValueError(f"{where}: expected a dict of {list(_LAYER_KEYS)}, got {type(s).__name__}")
    missing = [k for k in _LAYER_KEYS if k not in s]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    shape = tuple(layer.mask.shape)
    for key in ("mask", "ever"):
        t = s[key]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or tuple(t.shape) != shape:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: key {key!r} is {got}, expected a bool tensor of shape {shape}")
    g = s["dense_grad"]
    if g is not None and (not isinstance(g, torch.Tensor) or not g.is_floating_point() or tuple(g.shape) != shape):
        got = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"{where}: key 'dense_grad' is {got}, expected None or a float tensor of shape {shape}")
    budget = _int(s["budget"])
    if budget != layer.budget:
        raise ValueError(f"{where}: key 'budget' is {s['budget']!r}, this run's budget is {layer.budget} "
                         f"(different sparsity or distribution?)")
    ld = s["last_drop"]
    if isinstance(ld, bool) or not isinstance(ld, (int, float)) or not 0.0 <= float(ld) <= 1.0:
        raise ValueError(f"{where}: key 'last_drop' must be a number in [0, 1], got {ld!r}")
    mask, ever = s["mask"], s["ever"]
    if bool((mask & ~ever).any()):
        raise ValueError(f"{where}: key 'ever' lacks weights that are live in 'mask' (it must contain the mask)")
    problem = trainer._mask_problem(layer, mask)
    if problem:
        raise ValueError(f"{where}: key 'mask' {problem}")


def validate_state(trainer, state, version: int) -> None:
    """Raise ValueError (naming the layer and key) unless ``state`` can be loaded into ``trainer``."""
    m = trainer.method
    if not isinstance(state, dict) or "layers" not in state or "step" not in state:
        raise ValueError(f"{m}.load_state_dict: not a sparsifier state dict")
    if state.get("version") != version:
        raise ValueError(f"{m}.load_state_dict: unsupported state version {state.get('version')!r}")
    if state.get("method") != m:
        raise ValueError(f"{m}.load_state_dict: state was saved by {state.get('method')!r}")
    layers = state["layers"]
    if not isinstance(layers, dict):
        raise ValueError(f"{m}.load_state_dict: key 'layers' must be a dict, got {type(layers).__name__}")
    saved, mine = set(layers), {layer.name for layer in trainer._layers}
    if saved != mine:
        raise ValueError(f"{m}.load_state_dict: layers differ; missing {sorted(mine - saved)}, "
                         f"unexpected {sorted(saved - mine)}")
    for layer in trainer._layers:
        _check_layer(trainer, layer, layers[layer.name])

    step = _int(state["step"])
    hi = trainer.total_steps
    if step is None or step < 0 or (hi is not None and step > hi):
        rng = f"[0, {hi}] (total_steps)" if hi is not None else ">= 0"
        raise ValueError(f"{m}.load_state_dict: key 'step' must be an integer in {rng}, got {state['step']!r}")
    for key, lo, top in (("updates", 0, step), ("acc_steps", 0, trainer.grad_accumulation)):
        v = _int(state.get(key))
        if v is None or not lo <= v <= top:
            raise ValueError(f"{m}.load_state_dict: key {key!r} must be an integer in [{lo}, {top}], "
                             f"got {state.get(key)!r}")
    hist = state.get("history")
    if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
        raise ValueError(f"{m}.load_state_dict: key 'history' must be a list of dicts")
