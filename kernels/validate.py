"""Index checks that keep every public condensed-kernel entry memory-safe, at O(1) per call.

The kernels read ``x[..., indices[i, j]]`` without bounds checks (a check per gathered element would
cost the batch-1 speed). So before any kernel runs, each public entry makes sure that every index
lies in ``[0, width)`` of the input it is about to read:

* :func:`index_max` scans an index tensor once (dtype, device, minimum >= 0, maximum) and caches
  the maximum *on the tensor itself*, tagged with the tensor's ``_version`` counter. In-place edits
  (``indices[0, 0] = 99``, ``indices.copy_(...)``, edits through any view of the same storage) bump
  that counter, so the next call rescans. A new tensor (``.to()``, ``.clone()``) has no cache.
* per call, :func:`check_linear` / :func:`check_conv2d` compare the cached maximum with the input's
  last dimension (channels x kernel area for conv): an attribute read, an integer compare.

Under ``torch.compile`` / ``torch.export`` / fake-tensor tracing, index *values* cannot be read;
only shapes, dtypes and devices are checked there (the condensed modules validate their own
indices at construction, and :func:`sparse_compile.load` validates every file tensor).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["index_max", "check_linear", "check_conv2d", "check_fan_in", "tracing", "fast_ok", "ATTR"]

# Cached on the index tensor: (id, version, data_ptr, max index or -1 when empty, widest input its
# dtype may index). id and data_ptr guard against the attribute travelling with a copy (deepcopy and
# pickling copy a tensor's __dict__) or surviving a ``.data =`` swap (which keeps the version counter).
ATTR = "_sparse_compile_index_max"
_INT16_MAX = 32767
_NO_LIMIT = 1 << 62
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack


def tracing() -> bool:
    """True under torch.compile / export or a dispatch mode (fake tensors): values are unreadable."""
    return bool(_is_compiling() or _dispatch_stack_len())


def index_max(indices: Tensor, op: str = "condensed op") -> int:
    """Largest index in ``indices`` (-1 when empty), after checking dtype, device and ``min >= 0``.

    Scans the tensor once per version (cached on the tensor); raises ``ValueError``/``TypeError``
    naming ``op``.
    """
    c = getattr(indices, ATTR, None)
    if c is not None and c[0] == id(indices) and c[1] == indices._version and c[2] == indices.data_ptr():
        return c[3]
    if indices.dtype not in (torch.int16, torch.int32, torch.int64):
        raise TypeError(f"{op}: indices dtype {indices.dtype} is not an integer index type (int16 or int32)")
    if indices.device.type == "meta":
        raise ValueError(f"{op}: indices are on the meta device (no values to read); move them to the "
                         "device of x")
    if indices.numel() == 0:
        mx = -1
    else:
        mn, mx_t = torch.aminmax(indices.detach())
        mn, mx = int(mn), int(mx_t)
        if mn < 0:
            raise ValueError(f"{op}: negative index {mn} in indices (every index must lie in [0, fan_in))")
    try:
        limit = _INT16_MAX + 1 if indices.dtype == torch.int16 else _NO_LIMIT
        setattr(indices, ATTR, (id(indices), indices._version, indices.data_ptr(), mx, limit))
    except (AttributeError, RuntimeError):  # a tensor subclass without __dict__: just no cache
        pass
    return mx


def fast_ok(indices: Tensor, width: int) -> bool:
    """The per-call check when the cache is current: every index < ``width`` and the dtype fits."""
    c = getattr(indices, ATTR, None)
    return (c is not None and c[0] == id(indices) and c[1] == indices._version and c[2] == indices.data_ptr()
            and c[3] < width <= c[4])


def check_fan_in(indices: Tensor, fan_in: int, op: str, what: str = "x's last dimension") -> None:
    """Raise unless every index of ``indices`` lies in ``[0, fan_in)`` and its dtype can hold them."""
    if indices.dtype == torch.int16 and fan_in - 1 > _INT16_MAX:
        raise TypeError(f"{op}: int16 indices cannot address a fan-in of {fan_in} ({what}); use int32")
    mx = index_max(indices, op)
    if mx >= fan_in:
        raise ValueError(f"{op}: index {mx} is out of range for a fan-in of {fan_in} ({what}); "
                         f"the indices need an input of at least {mx + 1}")


def check_linear(x: Tensor, indices: Tensor, op: str = "condensed_linear") -> None:
    """Per-call check of a condensed linear's indices against ``x``'s last dimension (O(1) when cached)."""
    if tracing() or (x.device.type == "meta" and indices.device.type == "meta"):
        return
    check_fan_in(indices, x.shape[-1], op)


def check_conv2d(x: Tensor, indices: Tensor, kernel_size, op: str = "condensed_conv2d") -> None:
    """Per-call check of a condensed conv's indices against ``C * kh * kw`` of ``x [N, C, H, W]``."""
    if tracing() or (x.device.type == "meta" and indices.device.type == "meta"):
        return
    c = x.shape[1]
    check_fan_in(indices, c * kernel_size[0] * kernel_size[1], op,
                 f"{c} input channels x kernel {tuple(kernel_size)}")


_CSR_ATTR = "_sparse_compile_csr_ok"


def check_csr(crow: Tensor, col: Tensor, values: Tensor, n_cols: int, op: str = "csr_mm") -> None:
    """Raise unless ``(crow, col, values)`` is a valid CSR matrix with ``n_cols`` columns.

    Scans once per (crow, col) version pair, cached on ``col``, as :func:`index_max` does.
    """
    key = (id(col), col._version, col.data_ptr(), id(crow), crow._version, crow.data_ptr(), int(n_cols),
           values.numel())
    if getattr(col, _CSR_ATTR, None) == key:
        return
    if crow.dim() != 1 or col.dim() != 1 or values.dim() != 1 or crow.numel() < 1:
        raise ValueError(f"{op}: crow_indices, col_indices and values must be 1-D (crow non-empty)")
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype != crow.dtype:
        raise TypeError(f"{op}: crow_indices / col_indices must both be int32 or int64")
    if "meta" in (crow.device.type, col.device.type):
        raise ValueError(f"{op}: CSR indices on the meta device have no values to check")
    nnz = values.numel()
    if col.numel() != nnz:
        raise ValueError(f"{op}: col_indices has {col.numel()} entries, values {nnz}")
    c = crow.detach()
    if int(c[0]) != 0 or int(c[-1]) != nnz or bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{op}: crow_indices must start at 0, be non-decreasing and end at nnz = {nnz}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= n_cols):
        raise ValueError(f"{op}: column index out of range [0, {n_cols}): min {int(col.min())}, "
                         f"max {int(col.max())}")
    try:
        setattr(col, _CSR_ATTR, key)
    except (AttributeError, RuntimeError):
        pass
