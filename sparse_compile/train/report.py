"""What a sparse training run looks like now: :class:`SparsityReport`, one :class:`MaskStats` per layer."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class MaskStats:
    """One layer's row of a :class:`SparsityReport`: its mask now (fan-in, budget, ablation) and its
    topology updates so far (drop fraction, ITOP)."""

    name: str
    kind: str  # "linear", "conv2d" or "param"
    shape: tuple
    fan_in_dense: int
    fan_in_min: int  # over active neurons
    fan_in_max: int
    active: int
    ablated: int
    nnz: int
    budget: int
    sparsity: float
    drop_fraction: float  # fraction of the live weights the last update removed
    itop: float  # fraction of the weights ever live
    head: bool = False
    dense: bool = False  # dense by option or by the distribution (no mask)

    @property
    def fan_in(self) -> str:
        """``k``, or ``min-max`` when the fan-in varies (RigL)."""
        if self.fan_in_min == self.fan_in_max:
            return str(self.fan_in_max)
        return f"{self.fan_in_min}-{self.fan_in_max}"


@dataclass
class SparsityReport:
    """State of a sparse training run: per layer, global figures and ITOP history.

    Prints as a table; :meth:`to_dict` / :meth:`to_json` serialise it. ``history`` holds one entry per
    topology update (and one for step 0): ``{"step", "itop", "layers": {name: itop}, "alpha",
    "sparsity", "ablated"}``.
    """

    method: str
    step: int
    total_steps: Optional[int]
    updates: int
    target_sparsity: float
    sparsity: float  # exact, from the masks, over every layer in the budget
    itop: float
    active: int
    ablated: int
    layers: list = field(default_factory=list)  # [MaskStats]
    skipped: dict = field(default_factory=dict)  # layer -> why it is dense and outside the budget
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = asdict(self)
        for rec, src in zip(d["layers"], self.layers):
            rec["shape"] = list(rec["shape"])
            rec["fan_in"] = src.fan_in
        return d

    def to_json(self, path=None, indent: int = 2) -> str:
        """The report as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def __str__(self) -> str:
        head = ("layer", "kind", "shape", "fan-in", "active", "ablated", "sparsity", "drop", "ITOP")
        rows = []
        for r in self.layers:
            flag = " (head)" if r.head else (" (dense)" if r.dense else "")
            rows.append((
                r.name + flag, r.kind, "x".join(map(str, r.shape)), r.fan_in, str(r.active), str(r.ablated),
                f"{100 * r.sparsity:.2f}%", f"{100 * r.drop_fraction:.1f}%", f"{100 * r.itop:.1f}%",
            ))
        w = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
        lines = [fmt(head), "  ".join("-" * x for x in w), *map(fmt, rows)]
        lines.append(
            f"{self.method} step {self.step}" + (f"/{self.total_steps}" if self.total_steps else "")
            + f", {self.updates} updates: global sparsity {100 * self.sparsity:.3f}% "
            f"(target {100 * self.target_sparsity:.2f}%), ITOP {100 * self.itop:.1f}%, "
            f"{self.active} active / {self.ablated} ablated neurons"
        )
        if self.skipped:
            lines.append(f"dense, outside the budget: {', '.join(self.skipped)}")
        return "\n".join(lines)

    __repr__ = __str__
