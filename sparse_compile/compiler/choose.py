"""Choose each layer's form: the mode's, or in "auto" the fastest exact candidate, timed on the
layer's real input (captured by running the example inputs) and cached."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from ..progress import Ticker
from ..timing import time_call
from .cache import timing_key
from .config import OptimizeConfig
from .forms import FORMS, _baseline
from .modules import CondensedConv2d, CondensedLinear, CSRConv2d, CSRLinear
from .plan import LayerPlan, _conv_padding, _effective
from .rewrite import _install, _placed
from .verify import _default_rtol, relative_error


def _candidates(s: LayerPlan, cfg: OptimizeConfig) -> tuple:
    """(forms to consider, {form: why not}) for a slot in "auto" mode."""
    base = _baseline(s)
    cands, why_not = [base], {}
    if base != "dense" and FORMS["dense"].unavailable(s, cfg) is None:
        cands.append("dense")  # ablated but not reduced: all rows dense may beat active rows + scatter
    for f in cfg.auto_forms:
        if f == base or f == "ablated_dense":
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
            s.candidates, s.why_not = cands, why_not
            if len(cands) > 1:
                auto.append(s)
            else:
                s.form = cands[0]
                parts = [f"{f}: {w}" for f, w in why_not.items()]
                s.reason = "only exact form" + (f" ({'; '.join(parts)})" if parts else "")
        else:
            fixed.append(s)
            why = FORMS[s.mode].unavailable(s, cfg)
            if why is None:
                s.form, s.reason = s.mode, f"mode {s.mode!r}"
                if s.mode == "ablated_dense" and not s.changed and not s.ablated:
                    s.form, s.reason = "dense", "no ablated neurons or dropped inputs (ablated_dense = dense)"
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
    # Provisional ablated-dense modules everywhere "auto" decides, to capture each layer's real input.
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
    except Exception:  # noqa: BLE001 - a layer that cannot be swapped; verification finds it (exact.py)
        pass
    finally:
        for h in hooks:
            h.remove()
    rtol = cfg.rtol if cfg.rtol is not None else _default_rtol(dtype, layer=True)
    ticker = Ticker("auto: timing the forms of layer", len(auto))
    for i, s in enumerate(auto):
        ticker.tick(i, s.name)
        if s.sample is None:
            s.reason = "not reached by the example inputs; kept " + s.form
            s.times = {}
            continue
        _autotune_slot(s, cfg, dev, dtype, cache, rtol)
        s.sample = None
        _install(s)
    ticker.close()


def _capture(slot):
    def hook(mod, args):
        if slot.sample is None and args and isinstance(args[0], Tensor):
            slot.sample = args[0].detach().clone()
    return hook


def _timing_params(s: LayerPlan, form: str, module: nn.Module) -> dict:
    e = _effective(s, s.active_only(form)) if form != "dense" else {"weight": s.module.weight, "bias": s.module.bias}
    p = {"kind": s.kind, "weight": list(e["weight"].shape), "bias": e["bias"] is not None,
         "scatter": s.scatters(form)}
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


def _autotune_slot(s: LayerPlan, cfg, dev, dtype, cache, rtol) -> None:
    cands, why_not = s.candidates, s.why_not
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
