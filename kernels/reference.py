"""Plain-torch reference implementations of the condensed ops.

They are the ground truth for the tests (run them in float64), the fallback when no optimized
kernel is available, and traceable by torch.compile / torch.export. Each rebuilds the dense
``[n, fan_in]`` weight with a scatter and calls the dense op: that costs the dense layer's memory
and flops, never ``batch * n * k`` memory, so it stays usable at any batch size.

Semantics (``n`` = ``values.shape[0]`` condensed neurons, ``k`` = ``values.shape[1]`` fan-in):

* linear: ``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]``
* conv2d: the same over the ``in * kh * kw`` fan-in of each output channel, in
  ``weight.reshape(out, -1)`` order (the column order of ``F.unfold``), groups = 1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["dense_weight", "condensed_linear_ref", "condensed_conv2d_ref"]


def dense_weight(values: torch.Tensor, indices: torch.Tensor, fan_in: int) -> torch.Tensor:
    """The dense ``[n, fan_in]`` matrix whose row ``i`` holds ``values[i]`` at ``indices[i]``.

    Uses ``scatter_add`` so the result is differentiable w.r.t. ``values`` (and duplicate indices,
    which the formats module never produces, would add up like the gather formula says).
    """
    w = values.new_zeros(values.shape[0], fan_in)
    return w.scatter_add(1, indices.long(), values)


def condensed_linear_ref(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]`` in plain torch."""
    w = dense_weight(values, indices, x.shape[-1])
    return F.linear(x, w, bias)


def condensed_conv2d_ref(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    """Conv2d (groups=1) of ``x [N, C, H, W]`` with the condensed weight, in plain torch."""
    kh, kw = kernel_size
    c = x.shape[1]
    w = dense_weight(values, indices, c * kh * kw).reshape(values.shape[0], c, kh, kw)
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))
