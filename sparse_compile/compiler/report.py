"""What ``optimize`` did: :class:`OptimizeReport`, one :class:`LayerReport` per layer."""
from __future__ import annotations

import json
import statistics
import textwrap
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


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KB"


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
        #: With ``OptimizeConfig.dtype``: max relative error against the model in its own dtype.
        self.error_vs_original_dtype = None

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
            "error_vs_original_dtype": self.error_vs_original_dtype,
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
        rep = cls(layers, mode=d.get("mode"), restores=d.get("restores", []), notes=d.get("notes", []),
                   verify_rel_err=d.get("verify_rel_err"), traced=d.get("traced", True), cache=d.get("cache"),
                   whole_model=d.get("whole_model"))
        rep.error_vs_original_dtype = d.get("error_vs_original_dtype")
        return rep

    def speedup(self) -> Optional[float]:
        """Whole-model speedup over the original layers measured by "auto"'s check (None if not run)."""
        wm = self.whole_model or {}
        ms = wm.get("median_ms") or {}
        orig = ms.get("original")
        chosen = ms.get(wm.get("chosen"), orig)  # "original layers" is timed as "original"
        return orig / chosen if orig and chosen else None

    def summary(self) -> str:
        """One line: layers by form, weight bytes before and after, the measured speedup if any."""
        counts: dict = {}
        for r in self:
            counts[r.form] = counts.get(r.form, 0) + 1
        forms = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        b0, b1 = self.bytes_before, self.bytes_after
        mode = self.mode if isinstance(self.mode, str) else "by pattern"
        line = (f"{mode}: {len(self)} layer(s) ({forms or 'none'}); weights {_size(b0)} -> {_size(b1)}"
                + (f" ({b0 / b1:.1f}x smaller)" if b1 and b0 > b1 * 1.05 else ""))
        sp = self.speedup()
        if sp is not None:
            line += f"; measured speedup {sp:.2f}x (whole model)"
        if not self.traced:
            line += "; NOT traced (modules swapped in place)"
        return line

    def outliers(self) -> dict:
        """Layer name -> why its timing looks wrong: among layers of the same kind and shape (3 or
        more, e.g. repeated blocks), a form timed over 2x away from the group's median. Usually a
        busy machine during that measurement; rerun with the cache off to re-time."""
        groups: dict = {}
        for r in self:
            if r.times_us:
                groups.setdefault((r.kind, tuple(r.shape)), []).append(r)
        out = {}
        for group in groups.values():
            if len(group) < 3:
                continue
            for f in set.intersection(*(set(r.times_us) for r in group)):
                med = statistics.median(r.times_us[f] for r in group)
                for r in group:
                    t = r.times_us[f]
                    if med > 0 and (t > 2 * med or t < med / 2) and r.name not in out:
                        out[r.name] = f"{f} {t:.1f} us vs {med:.1f} us median of {len(group)} same-shape layers"
        return out

    def __str__(self) -> str:
        return self.table()

    def table(self, width: int = 100) -> str:
        """The summary line, a per-layer table at most ``width`` columns wide, then each layer's
        timings and reason, and the notes."""
        head = ["layer", "shape", "sparse", "fan-in", "active", "form", "output", "time us", "gain", "KB"]
        flagged = self.outliers()
        kb = lambda b: f"{b / 1024:.0f}" if b >= 10 * 1024 else f"{b / 1024:.1f}"  # noqa: E731
        rows = []
        for r in self:
            t = r.times_us.get(r.form)
            d = r.times_us.get("dense")
            rows.append([
                r.name, "x".join(map(str, r.shape)), f"{100 * r.sparsity:.1f}%", r.fan_in,
                f"{r.active}/{r.active + r.ablated}", r.form, r.output,
                "-" if t is None else f"{t:.1f}" + ("!" if r.name in flagged else ""),
                f"{d / t:.2f}x" if t and d and r.form != "dense" else "-",
                f"{kb(r.bytes_before)}->{kb(r.bytes_after)}",
            ])
        if all(r.output == "full" for r in self):  # nothing ablated was reduced or scattered
            del head[6]
            for row in rows:
                del row[6]
        w = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
        sep = "  " if sum(w[1:]) + 2 * (len(w) - 1) + 12 <= width else " "
        room = width - (sum(w[1:]) + len(sep) * (len(w) - 1))
        if w[0] > max(room, 8):  # long names lose their middle, the table keeps its width
            w[0] = max(room, 8)
            for row in rows:
                if len(row[0]) > w[0]:
                    keep = w[0] - 1
                    row[0] = row[0][: keep - keep // 2] + "~" + row[0][len(row[0]) - keep // 2:]
        left = {0, head.index("form")} | ({head.index("output")} if "output" in head else set())
        fmt = lambda cells: sep.join(  # noqa: E731
            (c.ljust(w[i]) if i in left else c.rjust(w[i])) for i, c in enumerate(cells)).rstrip()
        lines = [self.summary(), fmt(head), fmt(tuple("-" * x for x in w))] + [fmt(row) for row in rows]
        lines.extend(textwrap.wrap(coverage(self).line(), width, subsequent_indent="  "))
        if flagged:
            lines.append("! timing outlier (a busy machine? re-time with cache=False / --no-cache): "
                         + "; ".join(f"{k}: {v}" for k, v in flagged.items()))
        lines.append("per layer: time per form in us (* chosen), and why:")
        for r in self:
            t = ", ".join(f"{f}{'*' if f == r.form else ''} {v:.1f}" for f, v in r.times_us.items())
            lines.extend(textwrap.wrap(f"{r.name}: " + (f"{t}; " if t else "") + r.reason, width,
                                       initial_indent="  ", subsequent_indent="      "))
        if self.verify_rel_err is not None:
            lines.append(f"checked against the original on the example inputs: max relative error "
                         f"{self.verify_rel_err:.2e}")
        if self.restores:
            lines.append(f"full width restored at {len(self.restores)} place(s):")
            for r in self.restores:
                lines.extend(textwrap.wrap(f"{r['node']} -> {r['user']}: {r['reason']}", width,
                                           initial_indent="  ", subsequent_indent="      "))
        for n in self.notes:
            lines.extend(textwrap.wrap(f"note: {n}", width, subsequent_indent="      "))
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
