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
import glob
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"optimize: device {str(dev)!r} asked for, but CUDA is not available on this machine "
                         f"(torch {torch.__version__}); use device='cpu'")
    _say_what_is_missing(model, cfg)
    if dev.type == "cpu" and cfg.mode != "dense":
        from ..progress import cpu_kernels

        cpu_kernels()  # the first build takes ~20 s: say so instead of going silent
    work = copy.deepcopy(model).eval().to(dev)
    inputs = None if example_inputs is None else tuple(_to_device(x, dev) for x in example_inputs)
    reference, src = None, model  # src: what the bisection and the whole-model check rebuild from
    if cfg.dtype is not None:
        work, inputs, reference = _cast(work, inputs, getattr(torch, cfg.dtype))
        src = copy.deepcopy(work)  # rebuilds must start from the cast model, as `work` did
    # Only for mode "auto" itself: a dict of patterns pins some layers, and "the original layers"
    # would override those choices.
    check = cfg.mode == "auto" and cfg.whole_model_check and inputs is not None
    original = copy.deepcopy(work) if check else None  # the build below rewrites `work`'s modules
    gm = _build_verified(work, cfg, inputs, dev, uses_auto, fresh=lambda: copy.deepcopy(src).eval().to(dev))
    if check:
        from ..progress import slow

        with slow("auto: timing the whole model against the original (a few seconds)", "whole-model check done"):
            gm = _whole_model_check(gm, original, src, cfg, inputs, dev, uses_auto)
    if reference is not None:
        with torch.no_grad():
            err = relative_error(gm(*inputs), reference)
        gm.sparse_compile_report.error_vs_original_dtype = err
        gm.sparse_compile_report.notes.append(
            f"dtype {cfg.dtype}: max relative error {err:.2e} against the model in its own dtype on example_inputs")
    return gm


def _cast(work: nn.Module, inputs, dtype: torch.dtype):
    """``work`` and the floating ``inputs`` in ``dtype``, plus the uncast model's output on them.

    The reference is computed first so the report can say what the dtype change cost; integer and
    bool tensors (token ids, the ``weight_mask`` buffers) keep their dtype.
    """
    reference = None
    if inputs is not None:
        with torch.no_grad():
            reference = work(*inputs)
        inputs = tuple(x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs)
    return work.to(dtype), inputs, reference


def _say_what_is_missing(model: nn.Module, cfg: OptimizeConfig) -> None:
    """Warn when there is nothing sparse to optimize, or a pattern of a ``mode`` dict names no layer."""
    import fnmatch

    from ..formats import get_mask

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if isinstance(cfg.mode, dict):
        unmatched = [p for p in cfg.mode if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
        if unmatched:
            some = ", ".join(list(layers)[:6]) + (" ..." if len(layers) > 6 else "")
            warnings.warn(f"sparse_compile.optimize: mode pattern(s) {unmatched} match no Linear/Conv2d layer of "
                          f"{type(model).__name__} (its layers: {some or 'none'})", stacklevel=3)

    def sparse(m) -> bool:
        if get_mask(m) is not None:
            return True
        w = m.weight.detach()
        if w.numel() == 0:
            return False
        if float((w == 0).sum()) >= 0.5 * w.numel():
            return True
        # An ablated neuron (every weight zero) is what the ablated-dense form removes.
        return bool((w.reshape(w.shape[0], -1) == 0).all(dim=1).any())

    if cfg.mode != "dense" and not any(sparse(m) for m in layers.values()):
        warnings.warn(
            f"sparse_compile.optimize: {type(model).__name__} has no sparse layer (no weight_mask buffer, and no "
            "Linear/Conv2d with at least half of its weights zero or a neuron whose weights are all zero), so "
            "there is nothing to gain; its layers stay "
            "dense. A model trained with sparse_compile's trainer keeps its masks in the checkpoint: load it with "
            "sparse_compile.load_checkpoint(model, path).", stacklevel=3)


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
    pinned = []  # the first build's choices, so every rebuild of the bisection compares like with like

    def build(more):
        if first[0]:
            first[0] = False
            gm = _build(work, cfg, inputs, dev, uses_auto, keep=keep | more, reference=reference)
            forms = gm.sparse_compile_report.forms()
            if uses_auto and all(f in MODES for f in forms.values()):  # (a registered form is no mode)
                # "auto" times the forms again in each rebuild and may choose differently (a busy
                # machine), which would make the bisection blame layers that are not at fault.
                c = copy.copy(cfg)
                c.mode = {glob.escape(name): form for name, form in forms.items()}
                c.pad_condensed = True  # a layer auto condensed with padding stays so
                c.__post_init__()
                pinned.append(c)
            return gm
        c = pinned[0] if pinned else cfg
        with warnings.catch_warnings():  # the first build warned already
            warnings.simplefilter("ignore")
            return _build(fresh(), c, inputs, dev, uses_auto and not pinned, keep=keep | more,
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
