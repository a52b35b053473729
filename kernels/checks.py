"""Argument checks shared by every condensed kernel entry point (the public ops, the Triton
launchers, the modules that call them): accepted dtypes, int-or-pair arguments, conv output size.

Errors name the op and the faulty argument. Checks read shapes, dtypes and devices only; whether
the index *values* lie in range is :mod:`.validate`'s job (scanned once per index tensor).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["VALUE_DTYPES", "INDEX_DTYPES", "INT16_MAX_FAN_IN", "pair", "conv_out_hw", "check_linear_args",
           "check_conv_geometry"]

#: dtypes of x, values and bias (all three must match).
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: dtypes of the condensed indices.
INDEX_DTYPES = (torch.int16, torch.int32)
#: Largest fan-in int16 indices can address (indices up to 32767; beyond, they sign-extend).
INT16_MAX_FAN_IN = 2**15

Pair = Tuple[int, int]


def pair(v: Union[int, Sequence[int]], name: str = "argument", op: str = "") -> Pair:
    """``3 -> (3, 3)``, ``(1, 2) -> (1, 2)``; anything else raises a ValueError naming ``op`` / ``name``."""
    if isinstance(v, int):
        return int(v), int(v)
    t = tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"{op + ': ' if op else ''}{name} must be an int or a pair of ints, got {v!r}")
    return t


def conv_out_hw(h: int, w: int, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """Output height and width of a 2-D convolution (``torch.nn.Conv2d``'s formula)."""
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def check_linear_args(x, values, indices, bias, op: str = "condensed_linear", fan_in: Optional[int] = None) -> None:
    """Raise a clear TypeError/ValueError naming the faulty argument of a condensed call.

    ``x [..., fan_in]``, ``values`` / ``indices [n, k]``, ``bias [n]`` or None; x, values and bias
    share one dtype of :data:`VALUE_DTYPES` and all tensors one device. ``k`` must not exceed the
    fan-in: ``fan_in`` when given (a conv's ``C*kh*kw``), else x's last dimension.
    """
    for name, t in (("x", x), ("values", values), ("indices", indices)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (the fan-in), got a 0-d tensor")
    if x.dtype not in VALUE_DTYPES:
        raise TypeError(f"{op}: x dtype {x.dtype} not supported (float32, float16, bfloat16, float64)")
    if values.dim() != 2:
        raise ValueError(f"{op}: values must be 2-D [n, k], got shape {tuple(values.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: values dtype {values.dtype} must match x dtype {x.dtype}")
    if indices.shape != values.shape:
        raise ValueError(
            f"{op}: indices shape {tuple(indices.shape)} must equal values shape {tuple(values.shape)}"
        )
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: indices dtype {indices.dtype} not supported (int16 or int32)")
    if values.device != x.device or indices.device != x.device:
        raise ValueError(
            f"{op}: x ({x.device}), values ({values.device}) and indices ({indices.device}) "
            "must be on the same device"
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (values.shape[0],):
            raise ValueError(f"{op}: bias shape {tuple(bias.shape)} must be ({values.shape[0]},) (one per neuron)")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must match x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias device {bias.device} must match x device {x.device}")
    if fan_in is None and values.shape[1] > x.shape[-1]:
        raise ValueError(f"{op}: k = {values.shape[1]} exceeds x's fan-in {x.shape[-1]}")
    if fan_in is not None and values.shape[1] > fan_in:
        raise ValueError(f"{op}: k = {values.shape[1]} exceeds the fan-in C*kh*kw = {fan_in}")


def check_conv_geometry(x, kernel_size, stride, padding, dilation, op: str = "condensed_conv2d"):
    """Check a 2-D condensed convolution's input and geometry; returns ``(ks, st, pd, dl, (ho, wo))``.

    ``x`` must be ``[N, C, H, W]``; ``kernel_size``, ``stride``, ``padding``, ``dilation`` ints or
    pairs (kernel, stride, dilation >= 1, padding >= 0), and the output at least 1x1.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    ks, st, pd, dl = (pair(v, n, op) for v, n in (
        (kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    if min(ks) < 1 or min(st) < 1 or min(dl) < 1 or min(pd) < 0:
        raise ValueError(f"{op}: need kernel_size, stride, dilation >= 1 and padding >= 0, got "
                         f"{ks}, {st}, {dl}, {pd}")
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], ks, st, pd, dl)
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: input {tuple(x.shape[2:])} too small for kernel {ks} with padding {pd}, "
                         f"dilation {dl}")
    return ks, st, pd, dl, (ho, wo)
