"""The form registry (:data:`FORMS`, extend with :func:`register_form`): each form says why it
cannot serve a layer, or builds the module that computes the layer's (active) rows."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .. import formats
from .modules import CondensedConv2d, CondensedLinear, CSRConv2d, CSRLinear, StructuredConv2d, StructuredLinear
from .plan import _conv_padding, _grouped


@dataclass
class FormHandler:
    """A form: ``unavailable(slot, cfg)`` says why it cannot serve a layer (None: it can);
    ``build(slot, cfg)`` makes the module computing the layer's active rows from its (kept) input."""

    name: str
    unavailable: Callable
    build: Callable
    description: str = ""


FORMS: dict = {}


def register_form(handler: FormHandler) -> FormHandler:
    """Add (or replace) a form in the registry."""
    FORMS[handler.name] = handler
    return handler


def _dense_unavailable(slot, cfg):
    if slot.changed:
        return "its input or output is reduced (ablated_dense is its dense form)"
    return None


def _ablated_dense_unavailable(slot, cfg):
    if _grouped(slot):
        return f"grouped conv (groups={slot.module.groups}): dropping channels would change its groups"
    return None


def _sparse_common(slot, cfg) -> Optional[str]:
    if not slot.sparse:
        return "dense weight (no zeros, no mask)"
    if slot.info.numel < cfg.min_numel:
        return f"too small ({slot.info.numel} weights < min_numel {cfg.min_numel})"
    m = slot.module
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}; the sparse kernels pad with zeros"
        if _conv_padding(m) is None:
            return f"padding={m.padding!r} is asymmetric"
    return None


def _pad_ratio(slot) -> float:
    a = slot.info.active_fan_in
    return float(a.max()) * a.numel() / max(1, int(a.sum()))


def _condensed_unavailable(slot, cfg):
    why = _sparse_common(slot, cfg)
    if why:
        return why
    info = slot.info
    if not info.constant_fan_in:
        ratio = _pad_ratio(slot)
        rng = f"fan-in {info.fan_in_min}-{info.fan_in_max}"
        if slot.mode == "condensed" and not cfg.pad_condensed:
            if formats.get_mask(slot.module) is None and info.sparsity < 0.5:  # e.g. a few exact-zero init weights
                raise ValueError(
                    f"layer {slot.name!r} is not sparse: no weight_mask buffer and only {100 * info.sparsity:.2f}% "
                    f"of its weights are zero ({rng}), so it has no constant fan-in to condense. Load the trained "
                    "masks (sparse_compile.load_checkpoint), or leave this layer out of mode 'condensed'.")
            raise ValueError(
                f"layer {slot.name!r}: fan-in is not constant over active neurons ({rng}); the "
                "condensed form needs constant fan-in. Use mode 'auto' or 'csr' for this layer, or "
                "OptimizeConfig(pad_condensed=True) to pad rows to the maximum fan-in."
            )
        if slot.mode == "auto" and ratio > cfg.max_pad_ratio:
            return f"{rng} not constant (padding would cost {ratio:.2f}x > max_pad_ratio {cfg.max_pad_ratio})"
    return None


def _build_dense(slot, cfg):
    return slot.module


def _build_ablated_dense(slot, cfg):
    e = slot.effective("ablated_dense")
    m = slot.module
    rg = cfg.requires_grad
    if isinstance(m, nn.Conv2d):
        return StructuredConv2d(e["weight"], e["bias"], m.stride, m.padding, m.dilation, m.groups,
                                m.padding_mode, requires_grad=rg)
    return StructuredLinear(e["weight"], e["bias"], requires_grad=rg)


def _group_offsets(m: nn.Conv2d, rows: int) -> torch.Tensor:
    """Per output channel, where its group's input channels start in the ``[C_in, kh, kw]`` flattening.

    A grouped conv is a groups=1 conv whose weight is zero outside each output channel's group
    block; with constant fan-in per output channel it is a condensed groups=1 conv whose local
    index ``j`` (over ``[C_in/groups, kh, kw]``) becomes ``offset + j``.
    """
    per_group_out = m.out_channels // m.groups
    block = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    return (torch.arange(rows, device=m.weight.device) // per_group_out) * block


def _build_condensed(slot, cfg):
    e = slot.effective("condensed")
    m = slot.module
    c = formats.to_condensed(e["weight"], e["live"], e["bias"], name=slot.name, pad=True)
    if c.n_active != e["weight"].shape[0]:  # _effective gives every row a live entry
        raise RuntimeError(f"layer {slot.name!r}: condensed form lost rows")
    if isinstance(m, nn.Conv2d):
        indices, in_ch = c.indices, e["weight"].shape[1]
        if _grouped(slot):  # rows are all output channels (a grouped conv's output is never reduced)
            in_ch = m.in_channels
            full = formats.index_dtype_for(in_ch * m.kernel_size[0] * m.kernel_size[1])
            indices = (indices.to(torch.int64) + _group_offsets(m, indices.shape[0])[:, None]).to(full)
        return CondensedConv2d(c.values, indices, c.bias, in_ch, m.kernel_size, m.stride,
                               _conv_padding(m), m.dilation, requires_grad=cfg.requires_grad)
    return CondensedLinear(c.values, c.indices, c.bias, e["weight"].shape[1], requires_grad=cfg.requires_grad)


def _build_csr(slot, cfg):
    e = slot.effective("csr")
    m = slot.module
    csr = formats.to_csr(e["weight"], e["live"], active_only=False, name=slot.name).csr
    if isinstance(m, nn.Conv2d):
        in_ch = e["weight"].shape[1]
        if _grouped(slot):  # as in _build_condensed: columns move to the group's block
            in_ch = m.in_channels
            crow, col = csr.crow_indices(), csr.col_indices()
            col = col + torch.repeat_interleave(_group_offsets(m, crow.numel() - 1).to(col.dtype), crow.diff())
            csr = torch.sparse_csr_tensor(crow, col, csr.values(),
                                          (crow.numel() - 1, in_ch * m.kernel_size[0] * m.kernel_size[1]),
                                          check_invariants=True)
        return CSRConv2d(csr, e["bias"], in_ch, m.kernel_size, m.stride, _conv_padding(m), m.dilation)
    return CSRLinear(csr, e["bias"])


register_form(FormHandler("dense", _dense_unavailable, _build_dense, "the original layer"))

register_form(FormHandler("ablated_dense", _ablated_dense_unavailable, _build_ablated_dense,
                          "dense over active neurons and kept inputs"))

register_form(FormHandler("condensed", _condensed_unavailable, _build_condensed,
                          "condensed values/indices (torch.ops.sparse_compile)"))


@functools.lru_cache(maxsize=None)
def _csr_supported(device: str, dtype: torch.dtype) -> bool:
    """Whether torch has a CSR @ dense matmul for this device and dtype (CPU lacks bf16 / fp16)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            w = torch.eye(2, dtype=dtype, device=device).to_sparse_csr()
            torch.mm(w, torch.ones(2, 1, dtype=dtype, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _csr_unavailable(slot, cfg):
    why = _sparse_common(slot, cfg)
    if why:
        return why
    w = slot.module.weight
    if not _csr_supported(str(w.device), w.dtype):
        return f"torch has no sparse CSR matmul for {str(w.dtype).replace('torch.', '')} on {w.device.type}"
    return None


register_form(FormHandler("csr", _csr_unavailable, _build_csr, "torch.sparse_csr weight"))


def _baseline(slot) -> str:
    """The dense-compute form of a layer: the original, or dense over active rows / kept inputs."""
    if _grouped(slot):
        return "dense"
    return "ablated_dense" if (slot.changed or slot.ablated) else "dense"
