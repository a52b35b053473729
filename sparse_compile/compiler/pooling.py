"""Max-pooling in channels-last on CPU: one of ``optimize``'s exact rewrites that are not about sparsity.

torch's CPU ``max_pool2d`` on a contiguous NCHW tensor walks each channel's plane on its own; in
channels-last it runs vectorised across channels. For ResNet-50's stem pool (64 x 112 x 112,
3x3 stride 2) that is 3.2 -> 0.7 ms on 2 threads including both layout copies, about 7% of the
optimized ResNet-50's batch-1 forward on this project's 2-core EPYC (fp32 and bf16 alike). The
maximum is exact, so the output is bit-identical; with few channels (< 16) the layout copies cost
more than they save (measured 0.65-0.8x at 3-6 channels), so those inputs take torch's path.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelsLastMaxPool2d", "channels_last_max_pool2d", "swap_max_pools"]

#: Channels from which the channels-last path wins (measured 1.4-4.9x at 6-256 channels except
#: the tiniest maps; 0.65-0.8x at 3-6 channels).
MIN_CHANNELS = 16


@torch.fx.wrap  # FX (tracing an optimized model again) records one call instead of the branches
def channels_last_max_pool2d(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool) -> Tensor:
    """``F.max_pool2d`` of ``x``, taken in channels-last for a contiguous NCHW CPU input of >= 16
    channels and returned contiguous (bit-identical to ``F.max_pool2d(x, ...)``)."""
    if x.dim() == 4 and x.device.type == "cpu" and x.shape[1] >= MIN_CHANNELS and x.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode).contiguous()
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (without indices) computed by :func:`channels_last_max_pool2d`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices:
            return super().forward(x)
        return channels_last_max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                        self.ceil_mode)


def swap_max_pools(model: nn.Module) -> int:
    """Replace every plain ``nn.MaxPool2d`` submodule of ``model`` (in place) with a
    :class:`ChannelsLastMaxPool2d` of the same settings. Returns how many were replaced."""
    swaps = [(name, m) for name, m in model.named_modules()
             if name and type(m) is nn.MaxPool2d and not m.return_indices]
    for name, m in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = ChannelsLastMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation,
                                    return_indices=False, ceil_mode=m.ceil_mode)
        setattr(parent, child, new)
    return len(swaps)
