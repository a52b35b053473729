""""auto"'s whole-model check: time whole candidate models on the example inputs, keep the fastest."""
from __future__ import annotations

import copy
import statistics
import warnings

from ..timing import interleaved_times
from .exact import FAULT_REASON


#: Seconds of whole-model timing per candidate pair in the "auto" check (at least 3 repeats each).
WHOLE_MODEL_BUDGET_S = 3.0


def time_models(models: dict, inputs: tuple, dev, repeats: int, budget_s: float) -> dict:
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
    keep = frozenset(r.name for r in report if FAULT_REASON in r.reason)  # the layers at fault stay as they were
    models = {"optimized": gm, "original": original}
    if "condensed" in cfg.auto_forms and any(r.form != "condensed" and r.sparsity > 0 for r in report):
        c_cfg = copy.copy(cfg)
        c_cfg.mode, c_cfg.pad_condensed = "condensed", True
        try:
            models["condensed everywhere"] = _quiet_build(model, c_cfg, inputs, dev, False, keep)
        except Exception:  # noqa: BLE001 - a layer the condensed form cannot take: no such candidate
            pass
    t = time_models(models, inputs, dev, cfg.repeats, WHOLE_MODEL_BUDGET_S)
    cands = {k: (m, t[k]) for k, m in models.items() if k != "original"}
    if min(v[1] for v in cands.values()) > t["original"] and cfg.structural and report.traced:
        flat_cfg = copy.copy(cfg)
        flat_cfg.structural = False
        flat = _quiet_build(model, flat_cfg, inputs, dev, uses_auto, keep)
        t2 = time_models({"flat": flat, "original": original}, inputs, dev, cfg.repeats, WHOLE_MODEL_BUDGET_S)
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
        out = _quiet_build(model, dense_cfg, inputs, dev, False, keep)
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


def _quiet_build(model, cfg, inputs, dev, uses_auto, keep=frozenset()):
    """Another build of ``model`` for the whole-model check (keeping the layers in ``keep`` as they
    were); the first build already warned."""
    from .api import _build_verified  # the pipeline itself; api imports this module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build_verified(copy.deepcopy(model).eval().to(dev), cfg, inputs, dev, uses_auto, keep,
                               fresh=lambda: copy.deepcopy(model).eval().to(dev))
