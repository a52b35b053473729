"""What the trainer needs from ``torch.distributed``: the world size, a sum over ranks, rank 0's masks.

Every rank must hold the same masks: the dense gradients that decide a topology update are summed
over ranks, and the new masks are broadcast from rank 0.
"""
from __future__ import annotations

import torch


def world_size() -> int:
    """Number of processes in the default group (1 without ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def sum_over_ranks_(tensors: list) -> None:
    """All-reduce (sum) ``tensors`` in place, in one flat message."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    torch.distributed.all_reduce(flat)
    for t, g in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(g)


def masks_from_rank0(masks: list) -> list:
    """Rank 0's bool ``masks`` on every rank (one broadcast, as uint8)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors([m.to(torch.uint8) for m in masks])
    torch.distributed.broadcast(flat, 0)
    return [u.bool() for u in _unflatten_dense_tensors(flat, masks)]
