"""``sparse_compile.optimize(model)``: rewrite each sparse Linear / Conv2d into its fastest exact form.

One entry point, :func:`optimize`, configured by :class:`OptimizeConfig`; the forms are handlers in
a registry keyed by name (:data:`FORMS`, extend with :func:`register_form`):

========== ===================================================================================
dense      the original layer, untouched
structured ablated-dense: a dense layer over the active neurons (and the kept input columns)
condensed  ``torch.ops.sparse_compile`` condensed matmul / conv over the active neurons
csr        a ``torch.sparse_csr`` weight over the active neurons
========== ===================================================================================

The pass (FX):

1. copy the model (the input model is never changed), put it in eval mode, trace it;
2. replace ``nn.MultiheadAttention`` by :class:`~sparse_compile.compiler.modules.ExplicitMultiheadAttention`
   so its out-projection is a real, rewritable layer;
3. every non-dense layer with ablated neurons outputs only its active neurons; the removal is
   propagated through its consumers by :mod:`sparse_compile.compiler.propagate` (constants folded into the
   next layer's bias, or restored by a constant-filled scatter where that is not exact); a layer
   whose removal no consumer can absorb keeps its full width instead;
4. each layer gets its form: the mode's, or in ``"auto"`` the fastest exact one, measured on the
   target device with the shapes of ``example_inputs`` (cached, see :mod:`sparse_compile.compiler.cache`);
5. the result is checked against the original on ``example_inputs``.

The returned ``GraphModule`` carries the report as ``opt.sparse_compile_report`` (printable table,
``to_dict()`` / ``to_json()``). A model FX cannot trace falls back to swapping modules in place,
with a warning that names why.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import json
import statistics
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .. import formats
from .. import fx as tracing
from .cache import DecisionCache, interleaved_times, time_call, timing_key
from .modules import (
    CondensedConv2d,
    CondensedLinear,
    ConstantScatter,
    CSRConv2d,
    CSRLinear,
    ExplicitMultiheadAttention,
    StructuredConv2d,
    StructuredLinear,
    module_nbytes,
)
from .propagate import Reduced, propagate

__all__ = [
    "optimize",
    "OptimizeConfig",
    "OptimizeReport",
    "LayerReport",
    "FormHandler",
    "FORMS",
    "MODES",
    "register_form",
    "relative_error",
]

MODES = ("auto", "dense", "structured", "condensed", "csr")
CONFIG_VERSION = 1


@dataclass
class OptimizeConfig:
    """Everything :func:`optimize` can be told. Serialisable (``to_dict`` / ``from_dict``), versioned.

    mode:            "auto", "dense", "structured", "condensed", "csr", or a dict from layer-name
                     pattern (fnmatch, first match wins) to one of those; unmatched layers stay dense.
    device:          where the result runs and "auto" measures (default: the model's device).
    auto_forms:      forms "auto" may choose besides the layer's dense / structured baseline.
    min_numel:       layers with fewer weights are not worth a sparse kernel: kept dense / structured.
    pad_condensed:   in "condensed" mode, pad a non-constant fan-in to its maximum instead of raising.
    max_pad_ratio:   in "auto", also try padded condensed when ``max fan-in * n / nnz`` is at most this.
    repeats, warmup: timing of "auto" (median of ``repeats`` runs after ``warmup`` calls).
    cache, cache_dir: the on-disk timing cache (default dir: ``$SPARSE_COMPILE_CACHE``).
    rtol:            per-layer relative error a form must meet to count as exact in "auto"
                     (default by dtype: 1e-5 fp32, 1e-2 bf16/fp16, 1e-10 fp64).
    verify_rtol:     end-to-end check on ``example_inputs``; a larger error raises (default by dtype:
                     1e-4 fp32, 5e-2 bf16/fp16, 1e-8 fp64). None in ``verify`` disables it.
    structural:      drop ablated neurons and propagate the removal (False: keep full width).
    whole_model_check: in mode "auto" (not in a dict of patterns), time whole models on the
                     example inputs: the per-layer result, every sparse layer condensed, the
                     original (and, if nothing beats it, the per-layer choice without structural
                     changes); keep the fastest (per-layer timings cannot see what a layer's
                     narrower output costs the next layer, or a scatter's memory traffic).
    leaf_modules:    extra module types FX must not trace into.
    requires_grad:   whether the new parameters require grad (for fine-tuning the optimized model).
    """

    mode: Union[str, dict] = "auto"
    device: Optional[str] = None
    auto_forms: tuple = ("structured", "condensed", "csr")
    min_numel: int = 2048
    pad_condensed: bool = False
    max_pad_ratio: float = 1.25
    repeats: int = 15
    warmup: int = 2
    cache: bool = True
    cache_dir: Optional[str] = None
    rtol: Optional[float] = None
    verify: bool = True
    verify_rtol: Optional[float] = None
    structural: bool = True
    whole_model_check: bool = True
    leaf_modules: tuple = ()
    requires_grad: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self):
        _check_mode(self.mode)
        bad = [f for f in self.auto_forms if f not in FORMS or f == "dense"]
        if bad:
            raise ValueError(f"OptimizeConfig.auto_forms: unknown form(s) {bad}; known: {sorted(FORMS)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"OptimizeConfig: repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"OptimizeConfig version {self.version} is not supported (this is {CONFIG_VERSION})")
        self.auto_forms = tuple(self.auto_forms)
        self.leaf_modules = tuple(self.leaf_modules)

    def to_dict(self) -> dict:
        """JSON-ready dict (``leaf_modules`` as qualified class names)."""
        d = asdict(self)
        d["auto_forms"] = list(self.auto_forms)
        d["leaf_modules"] = [f"{t.__module__}.{t.__qualname__}" for t in self.leaf_modules]
        if self.device is not None:
            d["device"] = str(self.device)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizeConfig":
        """Inverse of :meth:`to_dict` (``leaf_modules`` are not restored: they name code)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"OptimizeConfig: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        d.pop("leaf_modules", None)
        d["auto_forms"] = tuple(d.get("auto_forms", cls.auto_forms))
        return cls(**d)


def _check_mode(mode) -> None:
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"optimize: mode must be one of {MODES} or a dict of pattern -> mode, got {mode!r}")
    elif isinstance(mode, dict):
        for k, v in mode.items():
            if not isinstance(k, str) or v not in MODES:
                raise ValueError(f"optimize: mode dict entry {k!r}: {v!r} (modes: {MODES})")
    else:
        raise ValueError(f"optimize: mode must be a string or a dict, got {type(mode).__name__}")


def _mode_for(mode, name: str) -> str:
    if isinstance(mode, str):
        return mode
    for pat, m in mode.items():
        if fnmatch.fnmatchcase(name, pat):
            return m
    return "dense"


# ---------------------------------------------------------------------------------------------
# Per-layer plan
# ---------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """One Linear / Conv2d of the model and what the pass decided for it."""

    name: str
    module: nn.Module
    install: Callable[[nn.Module], None]
    node: Optional[fx.Node] = None
    mode: str = "dense"
    shared: bool = False
    info: Optional[formats.LayerAnalysis] = None
    live: Optional[Tensor] = None
    out_reduce: bool = False
    in_state: Optional[Reduced] = None
    form: str = "dense"
    reason: str = ""
    times: dict = field(default_factory=dict)
    rel_err: Optional[float] = None
    new_module: Optional[nn.Module] = None
    sample: Optional[Tensor] = None
    # effective layer (rows x kept input columns), built lazily by _effective(), keyed by active_only
    eff: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"conv2d" or "linear"."""
        return "conv2d" if isinstance(self.module, nn.Conv2d) else "linear"

    @property
    def ablated(self) -> bool:
        """Whether some neurons are ablated (no live weight)."""
        return bool(self.info is not None and self.info.n_ablated > 0)

    @property
    def sparse(self) -> bool:
        """Whether some weights are not live."""
        return bool(self.info is not None and self.info.nnz < self.info.numel)

    @property
    def changed(self) -> bool:
        """Whether the layer cannot stay the original module (its input or output is reduced)."""
        return self.out_reduce or self.in_state is not None

    @property
    def needs_scatter(self) -> bool:
        """Structured computes only the active rows (a dense zero row costs a full fan-in); without
        a reduced output they go back in place. The sparse forms compute the ablated rows instead
        (an empty / zero row is nearly free), so their output needs no scatter."""
        return self.form == "structured" and self.ablated and not self.out_reduce

    def active_only(self, form: str) -> bool:
        """Whether ``form`` computes only the active rows of this layer."""
        return self.ablated and (self.out_reduce or form == "structured")


def _conv_padding(m: nn.Conv2d) -> Optional[tuple]:
    """Explicit integer padding of a conv (None when it cannot be expressed symmetrically)."""
    p = m.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0)
        out = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return tuple(out)
    return tuple(int(v) for v in p)


def _effective(slot: _Slot, active_only: bool) -> dict:
    """The layer restricted to its kept input columns (and its active rows when ``active_only``),
    with the bias fold.

    Returns dict(weight, live, bias): ``weight`` masked (exact zeros off the mask), ``live`` its
    mask where every row has at least one live entry (an ablated row, or one whose live inputs
    were all dropped, keeps a zero entry, so the sparse forms still see every row), ``bias`` with
    the dropped inputs' constant contribution added (computed in float64).
    """
    if active_only in slot.eff:
        return slot.eff[active_only]
    m = slot.module
    w = m.weight.detach()
    live = slot.live
    rows = slot.info.active_rows.to(w.device) if (slot.ablated and active_only) else None
    wm = w * live.to(w.dtype)
    bias = None if m.bias is None else m.bias.detach().to(torch.float64)
    if rows is not None:
        wm, live = wm[rows], live[rows]
        bias = None if bias is None else bias[rows]
    s = slot.in_state
    if s is not None:
        keep = s.keep.to(w.device)
        drop_c = s.dropped_const().to(device=w.device)
        w_drop = wm[:, ~keep].to(torch.float64)
        if w_drop.dim() == 4:
            w_drop = w_drop.sum(dim=(2, 3))
        fold = w_drop @ drop_c
        if bool((fold != 0).any()):
            bias = fold if bias is None else bias + fold
        wm, live = wm[:, keep], live[:, keep]
    live = live.clone()
    flat = live.reshape(live.shape[0], -1)
    empty = ~flat.any(dim=1)
    if bool(empty.any()) and flat.shape[1]:
        flat[empty, 0] = True
    slot.eff[active_only] = {
        "weight": wm.contiguous(),
        "live": live,
        "bias": None if bias is None else bias.to(w.dtype).contiguous(),
    }
    return slot.eff[active_only]


# ---------------------------------------------------------------------------------------------
# Form handlers
# ---------------------------------------------------------------------------------------------
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
        return "its input or output is reduced (structured is its dense form)"
    return None


def _grouped(slot) -> bool:
    return isinstance(slot.module, nn.Conv2d) and slot.module.groups != 1


def _structured_unavailable(slot, cfg):
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
        if m.groups != 1:
            return f"grouped conv (groups={m.groups}); the sparse kernels need groups=1"
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


def _build_structured(slot, cfg):
    e = _effective(slot, slot.active_only("structured"))
    m = slot.module
    rg = cfg.requires_grad
    if isinstance(m, nn.Conv2d):
        return StructuredConv2d(e["weight"], e["bias"], m.stride, m.padding, m.dilation, m.groups,
                                m.padding_mode, requires_grad=rg)
    return StructuredLinear(e["weight"], e["bias"], requires_grad=rg)


def _build_condensed(slot, cfg):
    e = _effective(slot, slot.active_only("condensed"))
    m = slot.module
    c = formats.to_condensed(e["weight"], e["live"], e["bias"], name=slot.name, pad=True)
    if c.n_active != e["weight"].shape[0]:  # _effective gives every row a live entry
        raise RuntimeError(f"layer {slot.name!r}: condensed form lost rows")
    if isinstance(m, nn.Conv2d):
        return CondensedConv2d(c.values, c.indices, c.bias, e["weight"].shape[1], m.kernel_size, m.stride,
                               _conv_padding(m), m.dilation, requires_grad=cfg.requires_grad)
    return CondensedLinear(c.values, c.indices, c.bias, e["weight"].shape[1], requires_grad=cfg.requires_grad)


def _build_csr(slot, cfg):
    e = _effective(slot, slot.active_only("csr"))
    m = slot.module
    csr = formats.to_csr(e["weight"], e["live"], active_only=False, name=slot.name).csr
    if isinstance(m, nn.Conv2d):
        return CSRConv2d(csr, e["bias"], e["weight"].shape[1], m.kernel_size, m.stride, _conv_padding(m), m.dilation)
    return CSRLinear(csr, e["bias"])


register_form(FormHandler("dense", _dense_unavailable, _build_dense, "the original layer"))
register_form(FormHandler("structured", _structured_unavailable, _build_structured,
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
    return "structured" if (slot.changed or slot.ablated) else "dense"


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def relative_error(a, b) -> float:
    """Max over tensor leaves of ``max|a - b| / max|b|`` (normwise; 0 when both are all zero)."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"outputs differ in structure: {len(la)} vs {len(lb)} leaves")
    err = 0.0
    for x, y in zip(la, lb):
        if not isinstance(y, Tensor):
            if x != y:
                return float("inf")
            continue
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if y.numel() == 0:
            continue
        x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64)
        den = float(y64.abs().max())
        num = float((x64 - y64).abs().max())
        if num != num:  # NaN
            return float("inf")
        err = max(err, num / den if den > 0 else (0.0 if num == 0 else float("inf")))
    return err


def _default_rtol(dtype, layer: bool) -> float:
    if dtype == torch.float64:
        return 1e-10 if layer else 1e-8
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2 if layer else 5e-2
    return 1e-5 if layer else 1e-4


def _set_submodule(root: nn.Module, target: str, m: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, m)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(x, device):
    return x.to(device) if isinstance(x, Tensor) else x


def _scatter_for(slot: _Slot) -> ConstantScatter:
    m = slot.module
    out = slot.info.out_features
    fill = torch.zeros(out, dtype=m.weight.dtype, device=m.weight.device)
    if m.bias is not None:
        fill = m.bias.detach().clone()
    fill[slot.info.active_rows.to(fill.device)] = 0
    return ConstantScatter(1 if slot.kind == "conv2d" else -1, slot.info.active_rows.to(fill.device), fill)


def _placed(slot: _Slot, module: nn.Module, form: Optional[str] = None) -> nn.Module:
    """The module to install: ``module``, followed by a scatter when its rows go back in place."""
    if (form or slot.form) == "structured" and slot.ablated and not slot.out_reduce:
        return nn.Sequential(module, _scatter_for(slot))
    return module


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------
def optimize(
    model: nn.Module,
    example_inputs=None,
    mode: Union[str, dict, None] = None,
    device=None,
    config: Optional[OptimizeConfig] = None,
    **overrides,
) -> nn.Module:
    """Rewrite ``model``'s sparse Linear / Conv2d layers into their fastest exact forms.

    ``example_inputs`` (a tensor or a tuple of positional inputs) give the shapes "auto" times with
    and are used to check the result against the original (required for ``mode="auto"``).
    ``mode``, ``device`` and any :class:`OptimizeConfig` field given as a keyword override
    ``config``. Returns an ``fx.GraphModule`` in eval mode (or, when FX cannot trace the model, a
    copy with modules swapped in place) whose ``sparse_compile_report`` attribute is an
    :class:`OptimizeReport`. The input model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    cfg = copy.copy(config) if config is not None else OptimizeConfig()
    if mode is not None:
        cfg.mode = mode
    if device is not None:
        cfg.device = device
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"optimize: unknown option {k!r} (see OptimizeConfig)")
        setattr(cfg, k, v)
    cfg.__post_init__()
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None:
        example_inputs = tuple(example_inputs)
    uses_auto = cfg.mode == "auto" or (isinstance(cfg.mode, dict) and "auto" in cfg.mode.values())
    if uses_auto and example_inputs is None:
        raise ValueError("optimize: mode 'auto' times the forms, so it needs example_inputs")

    if model.training and any(isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm)) for m in model.modules()):
        warnings.warn(
            "sparse_compile.optimize: the model is in training mode; the optimized model computes its eval-mode "
            "function (dropout off, BatchNorm with running statistics). Call model.eval() to compare.",
            stacklevel=2,
        )
    dev = torch.device(cfg.device) if cfg.device is not None else _model_device(model)
    work = copy.deepcopy(model).eval().to(dev)
    inputs = None if example_inputs is None else tuple(_to_device(x, dev) for x in example_inputs)
    # Only for mode "auto" itself: a dict of patterns pins some layers, and "the original layers"
    # would override those choices.
    check = cfg.mode == "auto" and cfg.whole_model_check and inputs is not None
    original = copy.deepcopy(work) if check else None  # the build below rewrites `work`'s modules
    gm = _build(work, cfg, inputs, dev, uses_auto)
    if check:
        gm = _whole_model_check(gm, original, model, cfg, inputs, dev, uses_auto)
    return gm


#: Seconds of whole-model timing per candidate pair in the "auto" check (at least 3 repeats each).
WHOLE_MODEL_BUDGET_S = 3.0


def _time_models(models: dict, inputs: tuple, dev, repeats: int, budget_s: float) -> dict:
    """Median seconds of one forward of each model on ``inputs`` (calls interleaved)."""
    fns = {k: (lambda m=m: m(*inputs)) for k, m in models.items()}
    return {k: statistics.median(v) for k, v in interleaved_times(fns, dev, repeats, budget_s).items()}


def _whole_model_check(gm, original, model, cfg, inputs, dev, uses_auto):
    """"auto"'s last step: time whole models on the example inputs and keep the fastest.

    Candidates: the per-layer result; every sparse layer condensed (per-layer timings miss effects
    between layers, e.g. channel counts and memory layouts, that can favour one form throughout);
    if neither beats the original, the per-layer choice without structural changes; and the original
    layers, kept when nothing beats them.
    """
    report = gm.sparse_compile_report
    models = {"optimized": gm, "original": original}
    if "condensed" in cfg.auto_forms and any(r.form != "condensed" and r.sparsity > 0 for r in report):
        c_cfg = copy.copy(cfg)
        c_cfg.mode, c_cfg.pad_condensed = "condensed", True
        try:
            models["condensed everywhere"] = _quiet_build(model, c_cfg, inputs, dev, False)
        except Exception:  # noqa: BLE001 - a layer the condensed form cannot take: no such candidate
            pass
    t = _time_models(models, inputs, dev, cfg.repeats, WHOLE_MODEL_BUDGET_S)
    cands = {k: (m, t[k]) for k, m in models.items() if k != "original"}
    if min(v[1] for v in cands.values()) > t["original"] and cfg.structural and report.traced:
        flat_cfg = copy.copy(cfg)
        flat_cfg.structural = False
        flat = _quiet_build(model, flat_cfg, inputs, dev, uses_auto)
        t2 = _time_models({"flat": flat, "original": original}, inputs, dev, cfg.repeats, WHOLE_MODEL_BUDGET_S)
        # Scale the second pair to the first pair's original: the two runs may see different load.
        cands["without structural changes"] = (flat, t2["flat"] * t["original"] / t2["original"])
    fastest = min(cands, key=lambda k: cands[k][1])
    if cands[fastest][1] < t["original"]:
        best = fastest
        out = cands[best][0]
        if best == "condensed everywhere":
            _adopt(out, report, cfg, "auto condensed every sparse layer: the whole model ran fastest that way")
    else:
        best = "original layers"
        dense_cfg = copy.copy(cfg)
        dense_cfg.mode = "dense"
        out = _quiet_build(model, dense_cfg, inputs, dev, False)
        _adopt(out, report, cfg, "auto kept the original layer: the whole model ran faster that way")
    ms = {k: round(v[1] * 1e3, 3) for k, v in cands.items()}
    ms["original"] = round(t["original"] * 1e3, 3)
    rep = out.sparse_compile_report
    rep.whole_model = {"median_ms": ms, "chosen": best}
    rep.notes.append(
        "whole model on the example inputs (median ms): "
        + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()) + f"; kept: {best}"
    )
    return out


def _adopt(out, report, cfg, why: str) -> None:
    """Make a whole-model candidate's report an "auto" report that keeps the per-layer timings."""
    first = {r.name: r for r in report}
    for r in out.sparse_compile_report:
        r0 = first.get(r.name)
        r.reason = f"{why} (see notes)"
        if r0 is not None:
            r.times_us = r0.times_us
            r.reason += f"; per layer: {r0.form}, {r0.reason}"
    out.sparse_compile_report.mode = cfg.mode
    out.sparse_compile_report.cache = report.cache
    out.sparse_compile_config = cfg.to_dict()


def _quiet_build(model, cfg, inputs, dev, uses_auto):
    """Another build of ``model`` for the whole-model check; the first build already warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build(copy.deepcopy(model).eval().to(dev), cfg, inputs, dev, uses_auto)


def _build(work: nn.Module, cfg: OptimizeConfig, inputs, dev, uses_auto: bool) -> nn.Module:
    """Trace ``work`` (an eval-mode copy on ``dev``), rewrite its layers, verify; the GraphModule."""
    dtype = _model_dtype(work)

    reference = None
    if inputs is not None and cfg.verify:
        with torch.no_grad():
            reference = work(*inputs)

    notes: list = []
    traced = True
    try:
        gm = work if isinstance(work, fx.GraphModule) else tracing.trace(work, cfg.leaf_modules)
        gm.eval()
    except Exception as e:  # FX raises many types (TraceError, TypeError, AttributeError...)
        traced = False
        gm = work
        msg = (f"sparse_compile.optimize: FX cannot trace {type(work).__name__} "
               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); swapping modules in "
               "place instead (ablated neurons are not propagated across layers)")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)

    if traced and inputs is not None:
        try:
            from torch.fx.passes.shape_prop import ShapeProp

            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as e:  # shapes only sharpen propagation; without them it is conservative
            notes.append(f"shape propagation failed ({type(e).__name__}: {e}); reshapes restore the full width")

    slots = _collect_slots(gm, traced, cfg, notes)
    for s in slots:
        _analyze_slot(s, cfg)

    restores = []
    if traced and cfg.structural:
        producers = {}
        for s in slots:
            if s.node is not None and s.out_reduce:
                producers[s.node] = _producer_state(s)
        by_node = {s.node: s for s in slots if s.node is not None}
        absorbs = lambda n, st: _absorbs(gm, by_node.get(n), n, st)  # noqa: E731
        if producers:
            # A reduction no layer absorbs would only be scattered back: such a layer computes its
            # ablated rows (constant) itself instead, which is cheaper for the sparse forms.
            plan = propagate(gm, producers, absorbs, dtype, dev, apply=False)
            for s in slots:
                if s.out_reduce and s.node.name not in plan.useful:
                    s.out_reduce = False
            producers = {n: st for n, st in producers.items() if n.name in plan.useful}
        if producers:
            res = propagate(gm, producers, absorbs, dtype, dev)
            restores = [asdict(r) for r in res.restores]
            for s in slots:
                if s.node is not None and s.node.name in res.absorbed:
                    s.in_state = res.absorbed[s.node.name]

    cache = DecisionCache(cfg.cache_dir, enabled=cfg.cache)
    _choose_forms(gm, slots, cfg, inputs, dev, dtype, cache)
    cache.save()

    if traced:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()

    verify_err = None
    if reference is not None:
        with torch.no_grad():
            out = gm(*inputs)
        verify_err = relative_error(out, reference)
        tol = cfg.verify_rtol if cfg.verify_rtol is not None else _default_rtol(dtype, layer=False)
        if not verify_err <= tol:
            raise RuntimeError(
                f"sparse_compile.optimize: the rewritten model differs from the original on the example "
                f"inputs (max relative error {verify_err:.3e} > {tol:.1e}); this is a bug, please report it "
                f"with the model. Per-layer forms: {[(s.name, s.form) for s in slots]}"
            )
    report = OptimizeReport(
        [_layer_report(s) for s in slots],
        mode=cfg.mode, restores=restores, notes=notes, verify_rel_err=verify_err, traced=traced,
        cache={"dir": str(cache.path.parent), "hits": cache.hits, "misses": cache.misses} if uses_auto else None,
    )
    gm.sparse_compile_report = report
    gm.sparse_compile_config = cfg.to_dict()
    if inputs is not None:
        gm.sparse_compile_input_spec = [
            {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in inputs if isinstance(x, Tensor)
        ] if all(isinstance(x, Tensor) for x in inputs) else None
    return gm


def _collect_slots(gm: nn.Module, traced: bool, cfg: OptimizeConfig, notes: list) -> list:
    """Every Linear / Conv2d: graph nodes, then layers inside leaf modules (MHA out-projections)."""
    slots: list = []
    done: set = set()
    # nn.MultiheadAttention reads out_proj.weight directly; make it call its out_proj.
    for name, m in list(gm.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            if _mode_for(cfg.mode, f"{name}.out_proj") == "dense":
                continue
            op = m.out_proj
            if formats.analyze(op.weight.detach(), formats.get_mask(op)).sparsity == 0:
                continue  # a dense out-projection: keep torch's (fused) attention
            why = ExplicitMultiheadAttention.unsupported_reason(m)
            if why:
                notes.append(f"{name}: kept nn.MultiheadAttention ({why}); its out_proj stays dense")
                done.add(f"{name}.out_proj")
                continue
            _set_submodule(gm, name, ExplicitMultiheadAttention.from_module(m))
    if traced:
        counts: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                counts[n.target] = counts.get(n.target, 0) + 1
        for n in tracing.sparse_module_nodes(gm):
            if n.target in done and counts[n.target] > 1:
                continue
            tgt = str(n.target)
            slots.append(_Slot(tgt, gm.get_submodule(tgt), _installer(gm, tgt), node=n, shared=counts[n.target] > 1))
            done.add(tgt)
    # Layers not called by the graph: inside leaf modules (our explicit attention), or every layer
    # when nothing was traced. A layer inside another torch.nn module (e.g. TransformerEncoderLayer,
    # whose fast path reads linear1.weight) cannot be swapped safely.
    seen_ids = {id(s.module) for s in slots}
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, ExplicitMultiheadAttention)
    parents = {name: m for name, m in gm.named_modules()}
    for name, m in gm.named_modules():
        if name in done or not isinstance(m, tracing.SPARSE_TYPES) or id(m) in seen_ids or not name:
            continue
        parent = parents[name.rpartition(".")[0]]
        if traced and not isinstance(parent, ExplicitMultiheadAttention):
            notes.append(f"{name}: inside leaf module {type(parent).__name__} that FX does not trace; kept as is")
            continue
        if type(parent).__module__.startswith("torch.nn") and not isinstance(parent, containers):
            notes.append(f"{name}: inside {type(parent).__name__}, which may read its weight directly; kept as is")
            continue
        slots.append(_Slot(name, m, _installer(gm, name)))
        seen_ids.add(id(m))
    return slots


def _installer(root, target):
    return lambda m: _set_submodule(root, target, m)


def _analyze_slot(s: _Slot, cfg: OptimizeConfig) -> None:
    s.mode = _mode_for(cfg.mode, s.name)
    w = s.module.weight
    mask = formats.get_mask(s.module)
    s.info = formats.analyze(w.detach(), mask, s.name)
    s.live = formats.live_mask(w.detach(), mask, s.name)
    if s.mode == "dense":
        return
    if s.info.n_active == 0:  # e.g. a zero-initialised head: its output is its bias, nothing to gain
        s.mode = "dense"
        s.reason = "all neurons ablated or zero (output is the bias); kept dense"
        return
    if mask is not None:
        outside = int(((w.detach() != 0) & ~s.live).sum())
        if outside:
            raise ValueError(
                f"layer {s.name!r}: {outside} non-zero weights lie outside its weight_mask, so the model "
                "does not compute what the mask describes; multiply the weight by the mask first"
            )
    if (cfg.structural and s.node is not None and not s.shared and s.ablated and s.info.n_active > 0
            and not _grouped(s)):
        s.out_reduce = True


def _producer_state(s: _Slot) -> Reduced:
    out = s.info.out_features
    keep = torch.zeros(out, dtype=torch.bool)
    keep[s.info.active_rows] = True
    const = torch.zeros(out, dtype=torch.float64)
    if s.module.bias is not None:
        const[~keep] = s.module.bias.detach().cpu().to(torch.float64)[~keep]
    if s.kind == "conv2d":
        dim = 1
    else:
        shape = (s.node.meta.get("tensor_meta") and getattr(s.node.meta["tensor_meta"], "shape", None))
        dim = len(shape) - 1 if shape is not None else -1
    return Reduced(dim, keep, const)


def _absorbs(gm, slot: Optional[_Slot], node: fx.Node, st: Reduced) -> Optional[str]:
    """None when layer ``slot`` can drop the reduced input columns, else why not."""
    if slot is None:
        return f"{node.target} is not a rewritable layer"
    if slot.mode == "dense":
        return f"layer {slot.name} is kept dense by its mode"
    if slot.shared:
        return f"layer {slot.name} is called at several places"
    m = slot.module
    if isinstance(m, nn.Conv2d):
        if st.dim != 1:
            return f"layer {slot.name}: reduced dim {st.dim} is not the conv channel dim"
        if m.groups != 1:
            return f"layer {slot.name} is a grouped conv"
        if m.in_channels != st.width:
            return f"layer {slot.name}: {m.in_channels} input channels, reduced tensor has {st.width}"
        pad = _conv_padding(m)
        if m.padding_mode != "zeros" or pad is None:
            return f"layer {slot.name} pads with {m.padding_mode}"
        if any(pad) and bool((st.dropped_const() != 0).any()):
            return (f"layer {slot.name} zero-pads a non-zero constant input, so the constant's "
                    "contribution differs at the border")
        return None
    shape = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    shape = getattr(shape, "shape", None)
    last = len(shape) - 1 if shape is not None else None
    if not (st.dim == -1 or (last is not None and st.dim == last)):
        return f"layer {slot.name}: reduced dim {st.dim} is not the feature dim"
    if m.in_features != st.width:
        return f"layer {slot.name}: {m.in_features} input features, reduced tensor has {st.width}"
    return None


def _candidates(s: _Slot, cfg: OptimizeConfig) -> tuple:
    """(forms to consider, {form: why not}) for a slot in "auto" mode."""
    base = _baseline(s)
    cands, why_not = [base], {}
    if base != "dense" and FORMS["dense"].unavailable(s, cfg) is None:
        cands.append("dense")  # ablated but not reduced: all rows dense may beat active rows + scatter
    for f in cfg.auto_forms:
        if f == base or f == "structured":
            continue
        why = FORMS[f].unavailable(s, cfg)
        if why:
            why_not[f] = why
        else:
            cands.append(f)
    return cands, why_not


def _choose_forms(gm, slots, cfg, inputs, dev, dtype, cache) -> None:
    fixed, auto = [], []
    for s in slots:
        if s.mode == "dense":
            s.form, s.reason = "dense", s.reason or "mode 'dense'"
        elif s.mode == "auto":
            cands, why_not = _candidates(s, cfg)
            s.times = {"_cands": cands, "_why_not": why_not}
            if len(cands) > 1:
                auto.append(s)
            else:
                s.form = cands[0]
                parts = [f"{f}: {w}" for f, w in why_not.items()]
                s.reason = "only exact form" + (f" ({'; '.join(parts)})" if parts else "")
                s.times = {}
        else:
            fixed.append(s)
            why = FORMS[s.mode].unavailable(s, cfg)
            if why is None:
                s.form, s.reason = s.mode, f"mode {s.mode!r}"
                if s.mode == "structured" and not s.changed and not s.ablated:
                    s.form, s.reason = "dense", "no ablated neurons or dropped inputs (structured = dense)"
            else:
                s.form = _baseline(s)
                s.reason = f"kept {s.form}: {why}"
    # Tiny layers are kept dense by design (reported, not warned about); other misses deserve a warning.
    unconverted = [s.name for s in fixed if s.form != s.mode and s.mode in ("condensed", "csr") and s.sparse
                   and s.info.numel >= cfg.min_numel]
    if unconverted:
        warnings.warn(
            f"sparse_compile.optimize: {len(unconverted)} sparse layer(s) not converted to the requested form "
            f"(see the report for why): {', '.join(unconverted[:8])}{' ...' if len(unconverted) > 8 else ''}",
            stacklevel=4,
        )
    for s in slots:
        if s not in auto:
            s.new_module = FORMS[s.form].build(s, cfg)
            _install(s)
    if not auto:
        return
    # Provisional structured modules everywhere "auto" decides, to capture each layer's real input.
    hooks = []
    for s in auto:
        base = FORMS[_baseline(s)].build(s, cfg)
        s.new_module = base
        s.form = _baseline(s)
        s.install(_placed(s, base))
        hooks.append(base.register_forward_pre_hook(_capture(s)))
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in hooks:
            h.remove()
    rtol = cfg.rtol if cfg.rtol is not None else _default_rtol(dtype, layer=True)
    for s in auto:
        if s.sample is None:
            s.reason = "not reached by the example inputs; kept " + s.form
            s.times = {}
            continue
        _autotune_slot(s, cfg, dev, dtype, cache, rtol)
        s.sample = None
        _install(s)


def _install(s: _Slot) -> None:
    if s.form != "dense" or s.new_module is not s.module:
        s.install(_placed(s, s.new_module))


def _capture(slot):
    def hook(mod, args):
        if slot.sample is None and args and isinstance(args[0], Tensor):
            slot.sample = args[0].detach().clone()
    return hook


def _timing_params(s: _Slot, form: str, module: nn.Module) -> dict:
    e = _effective(s, s.active_only(form)) if form != "dense" else {"weight": s.module.weight, "bias": s.module.bias}
    p = {"kind": s.kind, "weight": list(e["weight"].shape), "bias": e["bias"] is not None,
         "scatter": form == "structured" and s.ablated and not s.out_reduce}
    if isinstance(module, (CondensedLinear, CondensedConv2d)):
        p["k"] = module.k
        p["index_dtype"] = str(module.indices.dtype)
    if isinstance(module, (CSRLinear, CSRConv2d)):
        p["nnz"] = module.nnz
    if s.kind == "conv2d":
        m = s.module
        p.update(stride=list(m.stride), padding=list(_conv_padding(m) or (0, 0)), dilation=list(m.dilation),
                 groups=m.groups)
    return p


def _autotune_slot(s: _Slot, cfg, dev, dtype, cache, rtol) -> None:
    cands, why_not = s.times["_cands"], s.times["_why_not"]
    x = s.sample
    base_mod = s.new_module
    with torch.no_grad():
        ref = copy.deepcopy(_placed(s, base_mod, _baseline(s))).to(torch.float64)(x.to(torch.float64))
    times, errs, mods = {}, {}, {}
    for f in cands:
        mod = base_mod if f == _baseline(s) else FORMS[f].build(s, cfg)
        placed = _placed(s, mod, f)  # what will run, scatter included
        try:
            with torch.no_grad():
                y = placed(x)
            err = relative_error(y, ref)
        except Exception as e:  # a form that fails on this input is simply not a candidate
            why_not[f] = f"failed on the example input ({type(e).__name__}: {e})"
            continue
        errs[f] = err
        if not err <= rtol:
            why_not[f] = f"not exact (relative error {err:.1e} > {rtol:.0e})"
            continue
        key = timing_key(dev, dtype, tuple(x.shape), f, _timing_params(s, f, mod))
        t = cache.get(key)
        if t is None:
            t = time_call(lambda: placed(x), dev, cfg.repeats, cfg.warmup)
            cache.put(key, t)
        times[f] = t
        mods[f] = mod
    best = min(times, key=times.get)
    s.form, s.new_module, s.rel_err = best, mods[best], errs[best]
    s.times = {f: round(t * 1e6, 2) for f, t in times.items()}
    ranked = sorted(times, key=times.get)
    if len(ranked) > 1:
        s.reason = f"fastest: {times[ranked[1]] / times[best]:.2f}x faster than {ranked[1]}"
    else:
        s.reason = "only exact form"
    if why_not:
        s.reason += " (" + "; ".join(f"{f}: {w}" for f, w in why_not.items()) + ")"


def _layer_report(s: _Slot) -> LayerReport:
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
    times = {k: v for k, v in s.times.items() if not k.startswith("_")}
    return LayerReport(
        name=s.name, kind=s.kind, shape=tuple(m.weight.shape), sparsity=round(info.sparsity, 6), fan_in=fan,
        active=info.n_active, ablated=info.n_ablated, inputs_kept=f"{kept_in}/{total_in}", form=s.form,
        output=output, reason=s.reason, times_us=times, rel_err=s.rel_err, bytes_before=before, bytes_after=after,
    )
