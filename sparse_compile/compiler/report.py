"""What ``optimize`` did: :class:`OptimizeReport`, one :class:`LayerReport` per layer."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from .coverage import classify, coverage
from .modules import module_nbytes
from .plan import LayerPlan
from .rewrite import _placed


@dataclass
class LayerReport:
    """What ``optimize`` did with one layer."""

    name: str
    kind: str
    shape: tuple
    sparsity: float
    fan_in: str
    active: int
    ablated: int
    inputs_kept: str  # "kept/total" input columns (channels for a conv)
    form: str
    # "reduced": ablated neurons dropped (the removal propagates to consumers); "scatter": active rows
    # computed, then put back in a constant-filled output; "computed": the ablated (constant) rows are
    # computed too (nearly free in a sparse form); "full": no ablated neurons, or the original layer.
    output: str
    reason: str
    times_us: dict
    rel_err: Optional[float]
    bytes_before: int
    bytes_after: int
    nnz: int = 0  # live weights; coverage: see sparse_compile.compiler.coverage.classify
    coverage: str = ""


class OptimizeReport(list):
    """Per-layer :class:`LayerReport` list, plus where the full width was restored and why."""

    def __init__(self, layers=(), *, mode="auto", restores=(), notes=(), verify_rel_err=None,
                 traced=True, cache=None, whole_model=None):
        super().__init__(layers)
        #: "auto"'s whole-model check: {"median_ms": {candidate: ms}, "chosen": candidate}, or None.
        self.whole_model = whole_model
        self.mode = mode
        self.restores = list(restores)
        self.notes = list(notes)
        self.verify_rel_err = verify_rel_err
        self.traced = traced
        self.cache = cache or {}

    @property
    def bytes_before(self) -> int:
        """Weight + bias bytes of the original layers."""
        return sum(r.bytes_before for r in self)

    @property
    def bytes_after(self) -> int:
        """Bytes of the modules that replaced them (scatter buffers included)."""
        return sum(r.bytes_after for r in self)

    def forms(self) -> dict:
        """Layer name -> chosen form."""
        return {r.name: r.form for r in self}

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "mode": self.mode,
            "traced": self.traced,
            "verify_rel_err": self.verify_rel_err,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "cache": self.cache,
            "whole_model": self.whole_model,
            "notes": self.notes,
            "restores": [dict(r) for r in self.restores],
            "layers": [{**asdict(r), "shape": list(r.shape)} for r in self],
        }

    def to_json(self, **kw) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizeReport":
        """Inverse of :meth:`to_dict`."""
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in d.get("layers", [])]
        return cls(layers, mode=d.get("mode"), restores=d.get("restores", []), notes=d.get("notes", []),
                   verify_rel_err=d.get("verify_rel_err"), traced=d.get("traced", True), cache=d.get("cache"),
                   whole_model=d.get("whole_model"))

    def __str__(self) -> str:
        head = ("layer", "kind", "shape", "sparsity", "fan-in", "active", "inputs", "form", "output",
                "time per form (us)", "KB before", "KB after", "why")
        rows = []
        for r in self:
            t = "  ".join(f"{f}{'*' if f == r.form else ''} {v:.1f}" for f, v in r.times_us.items()) or "-"
            rows.append((
                r.name, r.kind, "x".join(map(str, r.shape)), f"{100 * r.sparsity:.1f}%", r.fan_in,
                f"{r.active}/{r.active + r.ablated}", r.inputs_kept, r.form, r.output, t,
                f"{r.bytes_before / 1024:.1f}", f"{r.bytes_after / 1024:.1f}", r.reason,
            ))
        w = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
        left = {0, 1, 7, 8, 9, 12}
        fmt = lambda cells: "  ".join(  # noqa: E731
            (c.ljust(w[i]) if i in left else c.rjust(w[i])) for i, c in enumerate(cells)).rstrip()
        lines = [fmt(head), fmt(tuple("-" * x for x in w))] + [fmt(row) for row in rows]
        counts: dict = {}
        for r in self:
            counts[r.form] = counts.get(r.form, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        lines.append(
            f"{len(self)} layers ({summary}); weights {self.bytes_before / 2**20:.2f} MiB -> "
            f"{self.bytes_after / 2**20:.2f} MiB; mode {self.mode!r}"
            + ("" if self.traced else "; NOT traced (modules swapped in place)")
        )
        lines.append(coverage(self).line())
        if self.verify_rel_err is not None:
            lines.append(f"checked against the original on the example inputs: max relative error "
                         f"{self.verify_rel_err:.2e}")
        if self.restores:
            lines.append(f"full width restored at {len(self.restores)} place(s):")
            for r in self.restores:
                lines.append(f"  {r['node']} -> {r['user']}: {r['reason']}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    __repr__ = __str__


def _layer_report(s: LayerPlan, cfg=None) -> LayerReport:
    info = s.info
    m = s.module
    before = m.weight.numel() * m.weight.element_size() + (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
    if s.form == "dense":
        after = before
    else:
        after = module_nbytes(_placed(s, s.new_module))
    fan = str(info.fan_in_min) if info.constant_fan_in else f"{info.fan_in_min}-{info.fan_in_max}"
    total_in = m.in_features if s.kind == "linear" else m.in_channels
    kept_in = total_in if s.in_state is None else s.in_state.n_kept
    if s.form == "dense" or not s.ablated:
        output = "full"
    elif s.out_reduce:
        output = "reduced"
    else:
        output = "scatter" if s.needs_scatter else "computed"
    times = dict(s.times)
    return LayerReport(
        name=s.name, kind=s.kind, shape=tuple(m.weight.shape), sparsity=round(info.sparsity, 6), fan_in=fan,
        active=info.n_active, ablated=info.n_ablated, inputs_kept=f"{kept_in}/{total_in}", form=s.form,
        output=output, reason=s.reason, times_us=times, rel_err=s.rel_err, bytes_before=before, bytes_after=after,
        nnz=info.nnz, coverage=classify(s, cfg) if cfg is not None else "",
    )
