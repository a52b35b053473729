"""What the trainer needs from ``torch.distributed``: the world size, a sum over ranks, rank 0's masks,
and a clean end of a torchrun worker.

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


def end_worker(code: int = 0) -> None:
    """End a torchrun worker process after its work is written: barrier, destroy the process group,
    flush, and ``os._exit(code)`` (no interpreter finalisation, no C++ static destructors).

    Why not a plain return: gloo keeps C++ worker threads alive after ``destroy_process_group()``;
    when the interpreter and then the C++ runtime tear down around them, the process can abort
    with "terminate called without an active exception" (SIGABRT), which torchrun then reports
    as a failed run although everything was written. The DDP test worker hit it about once in 20
    runs even after a barrier; skipping the teardown is the only way out that does not depend on
    gloo's thread timing. Does nothing but return when no process group is initialised (a
    single process, or a caller that manages its own group).
    """
    import gc
    import logging
    import os
    import sys

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()  # a DDP wrapper left in a reference cycle would still hold the group's work
    # The store of torchrun lives outside the workers, but a rank that destroys its group while
    # another still runs a collective makes the other fail: everyone leaves together.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
