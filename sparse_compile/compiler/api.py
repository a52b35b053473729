"""``sparse_compile.optimize(model)``: rewrite each sparse Linear / Conv2d into its fastest exact form.

One entry point, :func:`optimize`, configured by :class:`OptimizeConfig`; the forms are handlers in
a registry keyed by name (:data:`FORMS`, extend with :func:`register_form`):

============= ================================================================================
dense         the original layer, untouched
ablated_dense a dense layer over the active neurons (and the kept input columns)
condensed     ``torch.ops.sparse_compile`` condensed matmul / conv over the active neurons
csr           a ``torch.sparse_csr`` weight over the active neurons
============= ================================================================================

The pipeline, top to bottom (:func:`_build`):

1. **plan** (:mod:`.plan`): copy the model (the input model is never changed), put it in eval
   mode, trace it with FX, record shapes on ``example_inputs``; replace ``nn.MultiheadAttention``
   by :class:`~sparse_compile.compiler.modules.ExplicitMultiheadAttention` so its out-projection
   is a real, rewritable layer; one :class:`~.plan.LayerPlan` per Linear / Conv2d;
2. **propagate** (:mod:`.propagate`, rules in :mod:`.rules`): every non-dense layer with ablated
   neurons outputs only its active neurons, and the removal is propagated through its consumers
   (constants folded into the next layer's bias, or restored by a constant-filled scatter where
   that is not exact). One pass analyses the graph; only the removals some layer absorbs are
   applied (a layer whose removal nobody absorbs keeps its full width);
3. **choose** (:mod:`.choose`): a :class:`~.choose.Decision` per layer: the mode's form, or in
   ``"auto"`` the fastest exact one, measured on the target device with the shapes of
   ``example_inputs`` (cached, see :mod:`sparse_compile.compiler.cache`); nothing is installed;
4. **rewrite** (:mod:`.rewrite`): install the decisions;
5. **verify** (:mod:`.verify`, :mod:`.exact`): the result is checked against the original on
   ``example_inputs``; layers whose rewrite changes it are found by bisection and kept as they
   were, with a warning (``strict=True`` raises);
6. **report** (:mod:`.report`); in ``"auto"``, the whole-model check (:mod:`.whole_model`) then
   times other decision sets over the same plan and keeps the fastest model.

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
import weakref
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import exact
from .cache import DecisionCache
from .choose import choose
from .config import MODES, OptimizeConfig
from .forms import FORMS, FormHandler, register_form
from .plan import make_plan
from .propagate import propagate_plan
from .report import LayerReport, OptimizeReport, _layer_report
from .pooling import ChannelsLastMaxPool2d
from .rewrite import rewrite
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
    reference, src = None, model  # src: what the bisection rebuilds from
    if cfg.dtype is not None:
        work, inputs, reference = _cast(work, inputs, getattr(torch, cfg.dtype))
        src = copy.deepcopy(work)  # rebuilds must start from the cast model, as `work` did
    # Only for mode "auto" itself: a dict of patterns pins some layers, and "the original layers"
    # would override those choices.
    check = cfg.mode == "auto" and cfg.whole_model_check and inputs is not None
    original = copy.deepcopy(work) if check else None  # the build below rewrites `work`'s modules
    plans = weakref.WeakKeyDictionary() if check else None  # result -> its plan before the rewrite
    gm = _build_verified(work, cfg, inputs, dev, uses_auto, fresh=lambda: copy.deepcopy(src).eval().to(dev),
                         plans=plans)
    if check:
        from ..progress import slow

        with slow("auto: timing the whole model against the original (a few seconds)", "whole-model check done"):
            gm = _whole_model_check(gm, plans.pop(gm), original, cfg, inputs, dev)
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


def _build_verified(work, cfg, inputs, dev, uses_auto, keep=frozenset(), warn_level=4, fresh=None, plans=None):
    """:func:`_build`; with example inputs, layers whose rewrite changes the output are found and
    kept as they were (or, with ``cfg.strict``, an error is raised); see :mod:`.exact`.
    ``fresh()`` makes another copy like ``work`` for the bisection's rebuilds; ``plans``: see :func:`_build`."""
    if inputs is None or not cfg.verify:
        return _build(work, cfg, inputs, dev, uses_auto, keep=keep, plans=plans)
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
            gm = _build(work, cfg, inputs, dev, uses_auto, keep=keep | more, reference=reference, plans=plans)
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
                          reference=reference, plans=plans)

    def ok(gm):
        return gm.sparse_compile_report.verify_rel_err <= tol

    return exact.build_exact(build, ok, cfg, warn_level)


def _build(work: nn.Module, cfg: OptimizeConfig, inputs, dev, uses_auto: bool, keep=frozenset(),
           reference=None, plans=None) -> nn.Module:
    """Plan ``work`` (an eval-mode copy on ``dev``), propagate, choose, rewrite (every layer except
    those named in ``keep``), and report, with the error against ``reference`` (the original's
    output on ``inputs``). ``plans`` (a ``WeakKeyDictionary``): the result's plan, as it was before
    the rewrite, is kept there under the result (the whole-model check installs other decision sets
    in copies of it)."""
    dtype = _model_dtype(work)
    plan = make_plan(work, cfg, inputs, keep)
    propagate_plan(plan, dtype, dev)
    cache = DecisionCache(cfg.cache_dir, enabled=cfg.cache)
    decisions = choose(plan.gm, plan.slots, cfg, inputs, dev, dtype, cache)
    cache.save()
    pristine = plan.clone() if plans is not None else None
    gm = _rewrite_and_report(plan, decisions, cfg, inputs, reference,
                             cache={"dir": str(cache.path.parent), "hits": cache.hits, "misses": cache.misses}
                             if uses_auto else None)
    if plans is not None:
        plans[gm] = pristine
    return gm


def _rewrite_and_report(plan, decisions: dict, cfg: OptimizeConfig, inputs, reference, cache=None) -> nn.Module:
    """Install ``decisions`` in ``plan`` (:func:`~.rewrite.rewrite`), check the result against
    ``reference`` on ``inputs`` (when given) and attach the report and config."""
    gm = rewrite(plan.gm, plan.slots, decisions, cfg)
    notes = list(plan.notes)
    relus = sum(getattr(m, "activation", "") == "relu" for m in gm.modules())
    if relus:
        notes.append(f"{relus} ReLU(s) fused into the condensed conv before them (on CPU applied as the "
                     "outputs are stored)")
    pools = sum(isinstance(m, ChannelsLastMaxPool2d) for m in gm.modules())
    if pools:
        notes.append(f"{pools} max-pool layer(s) pool in channels-last on CPU (bit-identical; torch's NCHW "
                     "max-pool is 1.4-4.9x slower there from 16 channels)")
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
        [_layer_report(s, cfg) for s in plan.slots],
        mode=cfg.mode, restores=plan.restores, notes=notes, verify_rel_err=verify_err, traced=plan.traced,
        cache=cache,
    )
    gm.sparse_compile_report = report
    gm.sparse_compile_config = cfg.to_dict()
    if inputs is not None:
        gm.sparse_compile_input_spec = [
            {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in inputs if isinstance(x, Tensor)
        ] if all(isinstance(x, Tensor) for x in inputs) else None
    return gm
