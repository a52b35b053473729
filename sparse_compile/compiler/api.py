"""``sparse_compile.optimize(model)``: rewrite each sparse Linear / Conv2d into its fastest exact form.

One entry point, :func:`optimize`, configured by :class:`OptimizeConfig`; the forms are handlers in
a registry keyed by name (:data:`FORMS`, extend with :func:`register_form`):

============= ================================================================================
dense         the original layer, untouched
ablated_dense a dense layer over the active neurons (and the kept input columns)
condensed     ``torch.ops.sparse_compile`` condensed matmul / conv over the active neurons
csr           a ``torch.sparse_csr`` weight over the active neurons
============= ================================================================================

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
5. the result is checked against the original on ``example_inputs``; layers whose rewrite changes
   it are found by bisection and kept as they were, with a warning (``strict=True`` raises).

Only layers whose function is known exactly are rewritten (plain Linear / Conv2d, grouped convs,
no hooks; see :mod:`sparse_compile.compiler.exact`); the others are kept, with the reason in the report.

The returned ``GraphModule`` carries the report as ``opt.sparse_compile_report`` (printable table,
``to_dict()`` / ``to_json()``). A model FX cannot trace falls back to swapping modules in place,
with a warning that names why.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict
from typing import Optional, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import fx as tracing
from .cache import DecisionCache
from .choose import _choose_forms
from . import exact
from .config import MODES, OptimizeConfig
from .forms import FORMS, FormHandler, register_form
from .plan import _absorbs, _analyze_slot, _collect_slots, _producer_state
from .propagate import propagate
from .report import LayerReport, OptimizeReport, _layer_report
from .verify import _default_rtol, relative_error
from .whole_model import _whole_model_check


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
    gm = _build_verified(work, cfg, inputs, dev, uses_auto, fresh=lambda: copy.deepcopy(model).eval().to(dev))
    if check:
        gm = _whole_model_check(gm, original, model, cfg, inputs, dev, uses_auto)
    return gm


def _build_verified(work, cfg, inputs, dev, uses_auto, keep=frozenset(), warn_level=4, fresh=None):
    """:func:`_build`; with example inputs, layers whose rewrite changes the output are found and
    kept as they were (or, with ``cfg.strict``, an error is raised); see :mod:`.exact`.
    ``fresh()`` makes another copy like ``work`` for the bisection's rebuilds."""
    if inputs is None or not cfg.verify:
        return _build(work, cfg, inputs, dev, uses_auto, keep=keep)
    with torch.no_grad():
        reference = work(*inputs)
    if fresh is None:
        pristine = copy.deepcopy(work)
        fresh = lambda: copy.deepcopy(pristine)  # noqa: E731
    tol = cfg.verify_rtol if cfg.verify_rtol is not None else _default_rtol(_model_dtype(work), layer=False)
    first = [True]

    def build(more):
        if first[0]:
            first[0] = False
            return _build(work, cfg, inputs, dev, uses_auto, keep=keep | more, reference=reference)
        with warnings.catch_warnings():  # the first build warned already
            warnings.simplefilter("ignore")
            return _build(fresh(), cfg, inputs, dev, uses_auto, keep=keep | more,
                          reference=reference)

    def ok(gm):
        return gm.sparse_compile_report.verify_rel_err <= tol

    return exact.build_exact(build, ok, cfg, warn_level)


def _build(work: nn.Module, cfg: OptimizeConfig, inputs, dev, uses_auto: bool, keep=frozenset(),
           reference=None) -> nn.Module:
    """Trace ``work`` (an eval-mode copy on ``dev``), rewrite its layers (except those named in
    ``keep``), and measure its error against ``reference`` (the original's output on ``inputs``)."""
    dtype = _model_dtype(work)

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
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)

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
    for s in slots:
        if s.in_leaf and s.form != "dense":
            s.reason += f"; swapped in place inside {s.in_leaf} (FX does not trace into it)"
        if s.form == "condensed" and s.kind == "conv2d" and s.module.groups == s.module.in_channels > 1:
            s.reason += ("; depthwise: condensed as asked, but dense is often faster at fan-in 1-2 "
                         "(bench/grouped_conv.py); mode 'auto' measures it")

    if traced:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()

    verify_err = None
    if reference is not None:
        try:
            with torch.no_grad():
                verify_err = relative_error(gm(*inputs), reference)
        except Exception as e:  # noqa: BLE001 - e.g. a leaf module reading a replaced layer's weight
            verify_err = float("inf")
            notes.append(f"the rewritten model failed on the example inputs ({type(e).__name__}: {e})")
        if verify_err != verify_err:
            verify_err = float("inf")
    report = OptimizeReport(
        [_layer_report(s, cfg) for s in slots],
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
