"""The per-layer plan: every rewritable Linear / Conv2d of the traced model, what it computes (its
analysis, live mask, reduced output or input) and, once chosen, its form and module."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import formats
from .. import fx as tracing
from ..fx import set_submodule
from . import exact
from .config import OptimizeConfig, _mode_for
from .fold import fold_batchnorms
from .modules import ExplicitMultiheadAttention
from .rules import Reduced


@dataclass
class LayerPlan:
    """One Linear / Conv2d of the model and what the pass decided for it.

    What a form handler (:func:`~sparse_compile.compiler.forms.register_form`) reads: ``name``,
    ``module`` (the original layer), ``kind`` ("linear" / "conv2d"), ``mode``, ``info`` (its
    :class:`~sparse_compile.formats.WeightAnalysis`), ``ablated`` / ``sparse`` / ``changed``, and
    :meth:`effective` (the weight, mask and bias the form must compute with). The rewrite
    (:func:`~sparse_compile.compiler.rewrite.rewrite`) records the layer's
    :class:`~sparse_compile.compiler.choose.Decision` in the rest: ``form``, ``reason``, ``times``
    / ``candidates`` / ``why_not`` ("auto"), ``rel_err``, ``new_module``.
    """

    name: str
    module: nn.Module
    install: Callable[[nn.Module], None]
    node: Optional[fx.Node] = None
    mode: str = "dense"
    shared: bool = False
    info: Optional[formats.WeightAnalysis] = None
    live: Optional[Tensor] = None
    out_reduce: bool = False
    in_state: Optional[Reduced] = None
    form: str = "dense"
    reason: str = ""
    times: dict = field(default_factory=dict)  # form -> microseconds, the forms "auto" timed
    candidates: list = field(default_factory=list)  # forms "auto" considers (exact ones are timed)
    why_not: dict = field(default_factory=dict)  # form -> why it is not a candidate (or failed)
    rel_err: Optional[float] = None
    new_module: Optional[nn.Module] = None
    #: Unused since choose captures the layers' inputs itself; kept so LayerPlan's fields stay as they were.
    sample: Optional[Tensor] = None
    # effective layer (rows x kept input columns), built lazily by _effective(), keyed by active_only
    eff: dict = field(default_factory=dict)
    #: Why the layer must stay exactly as it is (not a plain layer, hooks, inside a torch.nn module
    #: that reads its weight, or at fault by the bisection); "" when it may be rewritten.
    keep_reason: str = ""
    #: The leaf module (FX does not trace into it) inside which this layer is swapped in place.
    in_leaf: str = ""

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
        return self.scatters(self.form)

    def active_only(self, form: str) -> bool:
        """Whether ``form`` computes only the active rows of this layer."""
        return self.ablated and (self.out_reduce or form == "ablated_dense")

    def scatters(self, form: str) -> bool:
        """Whether ``form``'s output goes back in place through a scatter: ablated-dense computes
        only the active rows, and without a reduced output the ablated rows' constants return."""
        return form == "ablated_dense" and self.ablated and not self.out_reduce

    def effective(self, form: str) -> dict:
        """The layer as ``form`` computes it: ``{"weight", "live", "bias"}`` over its kept input
        columns (and only its active rows when ``form`` computes only those), the dropped inputs'
        constant folded into ``bias``. What a :class:`~sparse_compile.compiler.forms.FormHandler`'s
        ``build`` starts from."""
        return _effective(self, self.active_only(form))


@dataclass
class Plan:
    """The model the pass works on (traced, or the copy whose modules are swapped in place) and a
    :class:`LayerPlan` per layer: what :func:`make_plan` and the propagation produce, before any
    decision is installed. ``restores``: where the propagation restored the full width (dicts)."""

    gm: nn.Module
    slots: list
    traced: bool
    notes: list = field(default_factory=list)
    restores: list = field(default_factory=list)

    def clone(self) -> "Plan":
        """An independent copy (model and layer plans) in which other decisions can be installed."""
        gm = copy.deepcopy(self.gm)
        nodes = {n.name: n for n in gm.graph.nodes} if isinstance(gm, fx.GraphModule) else {}
        slots = []
        for s in self.slots:
            c = copy.copy(s)
            try:
                c.module = gm.get_submodule(s.name)
            except AttributeError:  # neither called nor read by the graph: kept as is, never installed
                pass
            c.node = nodes.get(s.node.name) if s.node is not None else None
            c.install = _installer(gm, s.name)
            c.eff = {}  # rebuilt on demand, so no two models share a weight tensor
            slots.append(c)
        return Plan(gm, slots, self.traced, list(self.notes), list(self.restores))


def make_plan(work: nn.Module, cfg: OptimizeConfig, inputs, keep=frozenset()) -> Plan:
    """Trace ``work`` (an eval-mode copy on the target device; FX failing, its modules will be
    swapped in place), record shapes on ``inputs``, and plan every layer (:func:`_collect_slots`,
    :func:`_analyze_slot`); the layers named in ``keep`` stay as they are."""
    notes: list = []
    traced = True
    try:
        gm = work if isinstance(work, fx.GraphModule) else tracing.trace(work, cfg.leaf_modules, exact.make_leaf)
        gm.eval()
    except Exception as e:  # FX raises many types (TraceError, TypeError, AttributeError...)
        traced = False
        gm = work
        msg = (f"sparse_compile.optimize: FX cannot trace {type(work).__name__} "
               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); swapping modules in "
               "place instead (ablated neurons are not propagated across layers)")
        warnings.warn(msg, stacklevel=4)
        notes.append(msg)
    if traced:
        folded = fold_batchnorms(gm)
        if folded:
            notes.append(f"{folded} BatchNorm2d layer(s) folded into the conv before them (the same function; "
                         "one pass over each output fewer)")
    if traced and inputs is not None:
        try:
            from torch.fx.passes.shape_prop import ShapeProp

            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as e:  # shapes only sharpen propagation; without them it is conservative
            notes.append(f"shape propagation failed ({type(e).__name__}: {e}); reshapes restore the full width")
    slots = _collect_slots(gm, traced, cfg, notes, keep)
    for s in slots:
        _analyze_slot(s, cfg)
    return Plan(gm, slots, traced, notes)


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


def _effective(slot: LayerPlan, active_only: bool) -> dict:
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


def _grouped(slot) -> bool:
    return isinstance(slot.module, nn.Conv2d) and slot.module.groups != 1


def _collect_slots(gm: nn.Module, traced: bool, cfg: OptimizeConfig, notes: list, keep=frozenset()) -> list:
    """Every Linear / Conv2d of the model: graph nodes first, then layers the graph does not call
    (inside leaf modules FX does not trace, swapped in place there; or every layer when nothing was
    traced). Layers that must stay as they are get a ``keep_reason`` (reported, never rewritten)."""
    slots: list = []
    done: set = set()
    # nn.MultiheadAttention reads out_proj.weight directly; make it call its out_proj.
    for name, m in list(gm.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            if _mode_for(cfg.mode, f"{name}.out_proj") == "dense" or exact.has_hooks(m):
                continue
            op = m.out_proj
            if formats.analyze(op.weight.detach(), formats.get_mask(op)).sparsity == 0:
                continue  # a dense out-projection: keep torch's (fused) attention
            why = ExplicitMultiheadAttention.unsupported_reason(m)
            if why:
                notes.append(f"{name}: kept nn.MultiheadAttention ({why}); its out_proj stays dense")
                done.add(f"{name}.out_proj")
                continue
            set_submodule(gm, name, ExplicitMultiheadAttention.from_module(m))
    called: set = set()
    read: set = set()  # modules whose parameters the graph reads directly (get_attr)
    if traced:
        counts: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                counts[n.target] = counts.get(n.target, 0) + 1
                called.add(str(n.target))
            elif n.op == "get_attr":
                read.add(str(n.target).rpartition(".")[0])
        for n in tracing.sparse_module_nodes(gm):
            if n.target in done and counts[n.target] > 1:
                continue
            tgt = str(n.target)
            slots.append(LayerPlan(tgt, gm.get_submodule(tgt), _installer(gm, tgt), node=n, shared=counts[n.target] > 1))
            done.add(tgt)
    # Layers not called by the graph: inside leaf modules (our explicit attention, timm's no-trace
    # blocks, modules with hooks), or every layer when nothing was traced. A layer inside another
    # torch.nn module (e.g. TransformerEncoderLayer, whose fast path reads linear1.weight) is kept.
    seen_ids = {id(s.module) for s in slots}
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, ExplicitMultiheadAttention)
    parents = {name: m for name, m in gm.named_modules()}
    for name, m in gm.named_modules():
        if name in done or not isinstance(m, tracing.SPARSE_TYPES) or id(m) in seen_ids or not name:
            continue
        seen_ids.add(id(m))
        slot = LayerPlan(name, m, _installer(gm, name))
        parent = parents[name.rpartition(".")[0]]
        leaf = _leaf_ancestor(name, called) if traced else None
        if traced and leaf is None:
            slot.keep_reason = "not called as a module by the traced graph (its weight is read directly, or it is unused)"
        elif type(parent).__module__.startswith("torch.nn") and not isinstance(parent, containers):
            slot.keep_reason = f"inside {type(parent).__name__}, which may read its weight directly"
        elif leaf is not None and not isinstance(parents[leaf], ExplicitMultiheadAttention):
            slot.in_leaf = type(parents[leaf]).__name__
            if exact.reads_child_tensors(parent, name.rpartition(".")[2]):
                slot.keep_reason = f"inside {type(parent).__name__}, whose forward reads its weight / bias directly"
        slots.append(slot)
    for s in slots:
        if s.name in read and not s.keep_reason:
            s.keep_reason = "the traced graph reads its weight / bias directly"
        exact.refresh_pruned(s.module)
        why = s.keep_reason or exact.not_understood(s.module)
        if not why and s.name in keep:
            why = exact.FAULT_REASON
        s.keep_reason = why or ""
    return slots


def _leaf_ancestor(name: str, called: set) -> Optional[str]:
    """The nearest ancestor of module ``name`` that the traced graph calls (a leaf), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        if anc in called:
            return anc
    return None


def _installer(root, target):
    return lambda m: set_submodule(root, target, m)


def _analyze_slot(s: LayerPlan, cfg: OptimizeConfig) -> None:
    s.mode = _mode_for(cfg.mode, s.name)
    w = s.module.weight
    mask = formats.get_mask(s.module)
    s.info = formats.analyze(w.detach(), mask, s.name)
    s.live = formats.live_mask(w.detach(), mask, s.name)
    if s.keep_reason:
        s.mode, s.reason = "dense", f"kept as is: {s.keep_reason}"
        return
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


def _producer_state(s: LayerPlan) -> Reduced:
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


def _absorbs(gm, slot: Optional[LayerPlan], node: fx.Node, st: Reduced) -> Optional[str]:
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
