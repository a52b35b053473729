"""How close two outputs are, and how close they must be (per layer and end to end, by dtype)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves


def relative_error(a, b) -> float:
    """Max over tensor leaves of ``max|a - b| / max|b|`` (normwise; 0 when both are all zero)."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"outputs differ in structure: {len(la)} vs {len(lb)} leaves")
    err = 0.0
    for x, y in zip(la, lb):
        if not isinstance(y, Tensor):
            if x != y:
                return float("inf")
            continue
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if y.numel() == 0:
            continue
        x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64)
        den = float(y64.abs().max())
        num = float((x64 - y64).abs().max())
        if num != num:  # NaN
            return float("inf")
        err = max(err, num / den if den > 0 else (0.0 if num == 0 else float("inf")))
    return err


def _default_rtol(dtype, layer: bool) -> float:
    if dtype == torch.float64:
        return 1e-10 if layer else 1e-8
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2 if layer else 5e-2
    return 1e-5 if layer else 1e-4
