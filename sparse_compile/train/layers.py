"""The per-layer record a :class:`~sparse_compile.train.trainer.SparseTrainer` keeps, and the small
mask and argument helpers the trainer and the update rules share."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .budgets import fan_in_dense
from .discovery import Target


class _Layer:
    """Runtime state of one sparse weight."""

    def __init__(self, target: Target, budget: int):
        self.target = target
        self.budget = budget
        shape = tuple(target.param.shape)
        self.out = int(shape[0])
        self.fan_in_dense = fan_in_dense(shape)
        self.ever: Optional[torch.Tensor] = None
        self.dense_grad: Optional[torch.Tensor] = None
        self.last_drop = 0.0
        self.handles: list = []

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def mask_name(self) -> str:
        return f"{self.target.param_name}_mask"

    @property
    def param(self) -> nn.Parameter:
        return self.target.param

    @property
    def mask(self) -> torch.Tensor:
        # Looked up each time: model.to(device) replaces buffer objects.
        return getattr(self.target.module, self.mask_name)


def _zero_outside(t: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``t`` to 0 outside ``mask`` in place, by selection: ``t * mask`` would turn an inf or NaN at a
    masked position into NaN (inf * 0), which then leaks into the model's output."""
    t.masked_fill_(~mask, 0)


def _nnz(mask: torch.Tensor) -> int:
    """Number of True entries (``count_nonzero`` is ~15x faster than ``sum`` on a CPU bool tensor)."""
    return int(torch.count_nonzero(mask))


def _row_nnz(mask: torch.Tensor) -> torch.Tensor:
    """True entries per neuron (row of the ``[out, fan-in]`` view), int64."""
    return torch.count_nonzero(mask.reshape(mask.shape[0], -1), dim=1)


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def _check_frac(name: str, v, lo_open=True) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v <= 1 if lo_open else 0 <= v <= 1)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(0, 1]' if lo_open else '[0, 1]'}, got {v!r}")
    return float(v)
