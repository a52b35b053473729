""""auto"'s whole-model check: time whole candidate models on the example inputs, keep the fastest.

The candidates are decision sets over ONE plan (the traced, propagated model the per-layer choice
was made on): each is a copy of that plan with its decisions installed (:func:`~.rewrite.rewrite`),
so nothing is traced or propagated again. Only "without structural changes" (and "original layers"
after it) needs a plan without propagation; that second plan is made only when that candidate is.
"""
from __future__ import annotations

import copy
import statistics
import warnings

import torch
from torch import nn

from ..timing import interleaved_times
from .cache import DecisionCache
from .choose import choose
from .exact import FAULT_REASON
from .fold import fold_batchnorms
from .pooling import swap_max_pools
from .verify import _default_rtol


#: Seconds of whole-model timing per candidate pair in the "auto" check (at least 3 repeats each).
WHOLE_MODEL_BUDGET_S = 3.0


def time_models(models: dict, inputs: tuple, dev, repeats: int, budget_s: float) -> dict:
    """Median seconds of one forward of each model on ``inputs`` (calls interleaved)."""
    fns = {k: (lambda m=m: m(*inputs)) for k, m in models.items()}
    return {k: statistics.median(v) for k, v in interleaved_times(fns, dev, repeats, budget_s).items()}


def _whole_model_check(gm, plan, original, cfg, inputs, dev):
    """"auto"'s last step: time whole models on the example inputs and keep the fastest.

    ``gm``: the per-layer result, built from ``plan`` (its plan before the rewrite); ``original``:
    an untouched copy of the model. Candidates: the per-layer result; every sparse layer condensed
    (per-layer timings miss effects between layers, e.g. channel counts and memory layouts, that can
    favour one form throughout); if neither beats the original, the per-layer choice without
    structural changes; and the original layers, kept when nothing beats them. A candidate that does
    not match the original on the example inputs is dropped.
    """
    from .api import _model_dtype  # api imports this module

    report = gm.sparse_compile_report
    with torch.no_grad():
        reference = original(*inputs)
    tol = cfg.verify_rtol if cfg.verify_rtol is not None else _default_rtol(_model_dtype(original), layer=False)
    keep = frozenset(r.name for r in report if FAULT_REASON in r.reason)  # the layers at fault stay as they were
    timed_original = _like_candidates(original, cfg)
    models = {"optimized": gm, "original": timed_original}
    if "condensed" in cfg.auto_forms and any(r.form != "condensed" and r.sparsity > 0 for r in report):
        c_cfg = copy.copy(cfg)
        c_cfg.mode, c_cfg.pad_condensed = "condensed", True
        try:
            cand = _candidate(plan.clone(), c_cfg, inputs, dev, reference, tol, modes={"auto": "condensed"})
            if cand is not None:
                models["condensed everywhere"] = cand
        except Exception:  # noqa: BLE001 - a layer the condensed form cannot take: no such candidate
            pass
    t = time_models(models, inputs, dev, cfg.repeats, WHOLE_MODEL_BUDGET_S)
    cands = {k: (m, t[k]) for k, m in models.items() if k != "original"}
    flat_plan = plan  # without propagation already, unless structural changes were made
    if min(v[1] for v in cands.values()) > t["original"] and cfg.structural and report.traced:
        flat_cfg = copy.copy(cfg)
        flat_cfg.structural = False
        flat_plan = _plan(copy.deepcopy(original), flat_cfg, inputs, dev, keep)
        flat = _candidate(flat_plan.clone(), flat_cfg, inputs, dev, reference, tol, cache=True)
        if flat is not None:
            t2 = time_models({"flat": flat, "original": timed_original}, inputs, dev, cfg.repeats,
                             WHOLE_MODEL_BUDGET_S)
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
        if flat_plan is plan and any(s.changed for s in plan.slots):  # a tie: no second plan was made yet
            flat_cfg = copy.copy(cfg)
            flat_cfg.structural = False
            flat_plan = _plan(copy.deepcopy(original), flat_cfg, inputs, dev, keep)
        dense_cfg = copy.copy(cfg)
        dense_cfg.mode = "dense"
        out = _candidate(flat_plan, dense_cfg, inputs, dev, reference, None, modes={"auto": "dense"})
        _adopt(out, report, cfg, "auto kept the original layer: the whole model ran faster that way")
        for r in out.sparse_compile_report:  # classified as the dense build's; say why it is dense
            if r.coverage.startswith("mode 'dense'"):
                r.coverage = "auto: the whole model ran faster with its original layers"
    ms = {k: round(v[1] * 1e3, 3) for k, v in cands.items()}
    ms["original"] = round(t["original"] * 1e3, 3)
    rep = out.sparse_compile_report
    rep.whole_model = {"median_ms": ms, "chosen": best}
    rep.notes.append(
        "whole model on the example inputs (median ms): "
        + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()) + f"; kept: {best}"
    )
    return out


def _like_candidates(original, cfg):
    """The original model with the two rewrites every candidate has that are not about sparsity:
    BatchNorm folded into its conv (.fold, done when a plan is made) and max-pools in channels-last
    (.pooling, done by the rewrite). Timing the original without them would credit the sparse
    forms with what they do. Unchanged when there is nothing to fold or swap, or FX cannot trace it."""
    from .. import fx as tracing
    from . import exact

    if not any(type(m) in (nn.MaxPool2d, nn.BatchNorm2d) for m in original.modules()):
        return original
    m = copy.deepcopy(original)
    try:
        gm = tracing.trace(m, cfg.leaf_modules, exact.make_leaf)
        gm.eval()
        if fold_batchnorms(gm):
            m = gm
    except Exception:  # noqa: BLE001 - then the candidates were not folded either (same trace)
        pass
    swap_max_pools(m)
    return m


def _plan(work, cfg, inputs, dev, keep):
    """A second plan (trace + analysis + propagation as ``cfg`` says) of ``work``."""
    from .api import _model_dtype
    from .plan import make_plan
    from .propagate import propagate_plan

    with warnings.catch_warnings():  # the first build warned already
        warnings.simplefilter("ignore")
        plan = make_plan(work.eval().to(dev), cfg, inputs, keep)
        propagate_plan(plan, _model_dtype(work), dev)
    return plan


def _candidate(plan, cfg, inputs, dev, reference, tol, modes=None, cache=False):
    """``plan`` (consumed) with the decisions :func:`~.choose.choose` makes under ``cfg`` installed;
    ``modes`` maps a layer's planned mode to the one this candidate uses ("auto" -> "condensed").
    None when the result differs from ``reference`` by more than ``tol``."""
    from .api import _model_dtype, _rewrite_and_report

    for s in plan.slots:
        s.mode = (modes or {}).get(s.mode, s.mode)
    dc = DecisionCache(cfg.cache_dir, enabled=cfg.cache and cache)
    with warnings.catch_warnings():  # the first build warned already
        warnings.simplefilter("ignore")
        decisions = choose(plan.gm, plan.slots, cfg, inputs, dev, _model_dtype(plan.gm), dc)
        if cache:
            dc.save()
        out = _rewrite_and_report(plan, decisions, cfg, inputs, reference,
                                  cache={"dir": str(dc.path.parent), "hits": dc.hits, "misses": dc.misses}
                                  if cache else None)
    if tol is not None and cfg.verify and not out.sparse_compile_report.verify_rel_err <= tol:
        return None
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
