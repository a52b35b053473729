"""``sparse_compile.inspect``: one record per Linear/Conv2d weight of a model or state dict."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping, Union

import torch
from torch import nn

from ..formats import analyze, get_mask, index_dtype_for


@dataclass
class InspectRow:
    """One row of :func:`inspect`'s report: one layer's sparsity structure as plain JSON-ready figures."""

    name: str
    kind: str  # "linear" or "conv2d"
    shape: tuple
    sparsity: float
    fan_in_min: int
    fan_in_max: int
    active: int
    ablated: int
    constant_fan_in: bool
    bytes_dense_fp32: int
    bytes_condensed: int  # fp32 values + int16/int32 indices + int64 active rows


class InspectReport(list):
    """A list of :class:`InspectRow` that prints as a table and serialises with ``to_dict``."""

    @property
    def sparsity(self) -> float:
        """Global sparsity over the reported layers."""
        total = sum(r.bytes_dense_fp32 // 4 for r in self)
        live = sum(round((1 - r.sparsity) * r.bytes_dense_fp32 / 4) for r in self)
        return 1.0 - live / total if total else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict: global figures plus one dict per layer."""
        return {
            "global_sparsity": self.sparsity,
            "bytes_dense_fp32": sum(r.bytes_dense_fp32 for r in self),
            "bytes_condensed": sum(r.bytes_condensed for r in self),
            "layers": [{**asdict(r), "shape": list(r.shape)} for r in self],
        }

    def to_json(self, **kw) -> str:
        """``to_dict`` as a JSON string."""
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        head = ("layer", "kind", "shape", "sparsity", "fan-in", "active", "ablated", "const", "dense KB", "cond KB")
        rows = []
        for r in self:
            fan = str(r.fan_in_min) if r.fan_in_min == r.fan_in_max else f"{r.fan_in_min}-{r.fan_in_max}"
            rows.append((
                r.name, r.kind, "x".join(map(str, r.shape)), f"{100 * r.sparsity:.1f}%", fan,
                str(r.active), str(r.ablated), "yes" if r.constant_fan_in else "no",
                f"{r.bytes_dense_fp32 / 1024:.1f}", f"{r.bytes_condensed / 1024:.1f}",
            ))
        w = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w[i]) if i < 2 else h.rjust(w[i]) for i, h in enumerate(head))]
        lines.append("  ".join("-" * x for x in w))
        for row in rows:
            lines.append("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row)))
        dense = sum(r.bytes_dense_fp32 for r in self)
        cond = sum(r.bytes_condensed for r in self)
        lines.append(
            f"{len(self)} layers, global sparsity {100 * self.sparsity:.2f}%, "
            f"{dense / 1024:.1f} KB dense fp32 -> {cond / 1024:.1f} KB condensed"
        )
        return "\n".join(lines)

    __repr__ = __str__


def _record(name: str, weight: torch.Tensor, mask) -> InspectRow:
    info = analyze(weight, mask, name)
    k = info.fan_in_max
    idx_bytes = torch.tensor([], dtype=index_dtype_for(info.fan_in_dense)).element_size()
    return InspectRow(
        name=name,
        kind="linear" if weight.dim() == 2 else "conv2d",
        shape=tuple(weight.shape),
        sparsity=info.sparsity,
        fan_in_min=info.fan_in_min,
        fan_in_max=info.fan_in_max,
        active=info.n_active,
        ablated=info.n_ablated,
        constant_fan_in=info.constant_fan_in,
        bytes_dense_fp32=info.numel * 4,
        bytes_condensed=info.n_active * (k * (4 + idx_bytes) + 8),
    )


def inspect(model: Union[nn.Module, Mapping[str, torch.Tensor]]) -> InspectReport:
    """Report every Linear/Conv2d weight of ``model``: sparsity, fan-in, ablation, bytes.

    ``model`` is an ``nn.Module`` (masks are read from ``weight_mask`` buffers when present) or a
    state dict (``<layer>.weight`` 2-D or 4-D tensors, with ``<layer>.weight_mask`` when present).
    """
    report = InspectReport()
    if isinstance(model, nn.Module):
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                report.append(_record(name, m.weight, get_mask(m)))
        return report
    if isinstance(model, Mapping):
        for key, w in model.items():
            if not key.endswith(".weight") or not isinstance(w, torch.Tensor) or w.dim() not in (2, 4):
                continue
            if not w.is_floating_point():
                continue
            name = key[: -len(".weight")]
            report.append(_record(name, w, model.get(key + "_mask")))
        return report
    raise TypeError(f"inspect expects an nn.Module or a state dict, got {type(model).__name__}")
