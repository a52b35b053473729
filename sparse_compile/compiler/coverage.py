"""How much of a model's sparsity ``optimize`` put to use: the share of its sparse layers' live
weights held in a sparse form, and why the rest is not (grouped, counted)."""
from __future__ import annotations

from dataclasses import dataclass, field

#: Forms that store a layer sparsely (ablated-dense drops the ablated neurons' rows).
SPARSE_FORMS = ("condensed", "csr", "ablated_dense")


#: ``LayerReport.coverage`` of a sparse layer in a sparse form / of one below ``min_numel``.
IN_SPARSE_FORM, SMALL = "sparse form", "below min_numel"


def classify(slot, cfg) -> str:
    """A layer's (``LayerPlan``'s) part in the coverage figure: "" (its weight is dense),
    :data:`SMALL` (not counted), :data:`IN_SPARSE_FORM`, or why it is left dense (a short category)."""
    if not slot.sparse:
        return ""
    if slot.info.numel < cfg.min_numel:
        return SMALL
    if slot.form in SPARSE_FORMS:
        return IN_SPARSE_FORM
    if slot.keep_reason:
        r = slot.keep_reason
        if "overrides" in r:
            return f"kept: {type(slot.module).__name__} computes more than its weight (own forward)"
        if "hook" in r:
            return "kept: forward hooks"
        if "bisection" in r:
            return "kept: rewriting changed the output"
        if "reads its weight / bias directly" in r:
            return "kept: its weight is read directly (by the graph or its parent's forward)"
        if "inside" in r:
            return "kept: inside a torch.nn module that reads its weight"
        return "kept: not called as a module"
    if slot.mode == "dense":
        return "mode 'dense' (or no pattern matched)"
    if slot.mode == "auto":
        if "not reached" in slot.reason:
            return "auto: not reached by the example inputs"
        return "auto: a dense form was faster" if slot.times else "auto: no exact sparse form"
    r = slot.reason.split(": ", 1)[-1]
    return f"{slot.mode} unavailable: {r.split(' (')[0].split(';')[0]}"


@dataclass
class Coverage:
    """Live weights of the sparse layers (at least ``min_numel`` weights) by where they ended up."""

    sparse_weights: int = 0
    in_sparse_form: int = 0
    #: reason -> [layers, live weights] for the sparse layers left in a dense form
    left: dict = field(default_factory=dict)
    small_layers: int = 0  # sparse layers below min_numel, excluded from the figure

    @property
    def share(self) -> float:
        """Share of the sparse weights held in a sparse form (1.0 when there are none)."""
        return self.in_sparse_form / self.sparse_weights if self.sparse_weights else 1.0

    def line(self) -> str:
        """One line for the report."""
        if not self.sparse_weights:
            return "coverage: no sparse layer of at least min_numel weights"
        s = (f"coverage: {100 * self.share:.1f}% of the sparse weights are in a sparse form "
             f"({self.in_sparse_form:,} of {self.sparse_weights:,})")
        if self.left:
            s += "; left dense: " + ", ".join(
                f"{why} ({n} layer{'s' if n > 1 else ''}, {100 * w / self.sparse_weights:.1f}%)"
                for why, (n, w) in sorted(self.left.items(), key=lambda kv: -kv[1][1]))
        if self.small_layers:
            s += f"; {self.small_layers} sparse layer(s) below min_numel not counted"
        return s


def coverage(report) -> Coverage:
    """:class:`Coverage` of an :class:`~sparse_compile.compiler.report.OptimizeReport` (its layers'
    ``nnz`` and ``coverage`` fields)."""
    c = Coverage()
    for r in report:
        if not r.coverage:
            continue
        if r.coverage == SMALL:
            c.small_layers += 1
            continue
        c.sparse_weights += r.nnz
        if r.coverage == IN_SPARSE_FORM:
            c.in_sparse_form += r.nnz
        else:
            n, w = c.left.get(r.coverage, (0, 0))
            c.left[r.coverage] = (n + 1, w + r.nnz)
    return c
