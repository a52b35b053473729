"""Choose each layer's form: the mode's, or in "auto" the fastest exact candidate, timed on the
layer's real input (captured by running the example inputs) and cached.

:func:`choose` returns one :class:`Decision` per layer and changes nothing in the model; the
rewrite step (:mod:`.rewrite`) installs the decisions.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..progress import Ticker
from ..timing import time_call
from .cache import timing_key
from .config import OptimizeConfig
from .forms import FORMS, _baseline
from .modules import CondensedConv2d, CondensedLinear, CSRConv2d, CSRLinear
from .plan import LayerPlan, _conv_padding, _effective
from .rewrite import _placed
from .verify import _default_rtol, relative_error


@dataclass
class Decision:
    """What :func:`choose` decided for one layer; :func:`~.rewrite.rewrite` installs it.

    ``form`` names a handler of :data:`~.forms.FORMS`; ``padded``: a condensed layer whose rows are
    padded to the largest fan-in (its fan-in is not constant). "auto" fills ``times_us`` (form ->
    microseconds of the exact candidates it timed), ``candidates`` (the forms it considered),
    ``why_not`` (form -> why it is not a candidate, or failed) and ``rel_err`` (the chosen form's
    error against float64 on the layer's captured input). ``module``, when set, is the module
    already built for ``form`` (auto built it to time it); the rewrite builds one otherwise.
    """

    form: str
    reason: str = ""
    padded: bool = False
    times_us: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)
    why_not: dict = field(default_factory=dict)
    rel_err: Optional[float] = None
    module: Optional[nn.Module] = field(default=None, repr=False, compare=False)


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


def _fixed(s: LayerPlan, mode: str, cfg: OptimizeConfig) -> Decision:
    """The decision for a layer in a fixed mode: the mode's form, or its baseline and why."""
    if mode == "dense":
        return Decision("dense", s.reason or "mode 'dense'")
    why = FORMS[mode].unavailable(s, cfg)
    if why is not None:
        form = _baseline(s)
        return Decision(form, f"kept {form}: {why}")
    if mode == "ablated_dense" and not s.changed and not s.ablated:
        return Decision("dense", "no ablated neurons or dropped inputs (ablated_dense = dense)")
    return Decision(mode, f"mode {mode!r}")


def choose(gm: nn.Module, slots: list, cfg: OptimizeConfig, inputs, dev, dtype, cache) -> dict:
    """Layer name -> :class:`Decision` for every slot; ``gm`` (the planned model) is left as it is.

    "auto" layers run the example inputs through ``gm`` with every layer replaced by its
    provisional module (its baseline form; a fixed layer's chosen one) without installing them
    (an :class:`torch.fx.Interpreter` swaps them per call; layers inside FX leaves are read by a
    temporary hook on the original layer, which computes the same), then time their candidates.
    """
    decisions: dict = {}
    auto = []
    for s in slots:
        if s.mode == "auto":
            cands, why_not = _candidates(s, cfg)
            if len(cands) > 1:
                auto.append(s)
                decisions[s.name] = Decision(_baseline(s), candidates=cands, why_not=why_not)
            else:
                parts = [f"{f}: {w}" for f, w in why_not.items()]
                decisions[s.name] = Decision(cands[0], "only exact form" + (f" ({'; '.join(parts)})" if parts else ""),
                                             candidates=cands, why_not=why_not)
        else:
            decisions[s.name] = _fixed(s, s.mode, cfg)
    # Tiny layers are kept dense by design (reported, not warned about); other misses deserve a warning.
    unconverted = [s.name for s in slots if s.mode in ("condensed", "csr") and decisions[s.name].form != s.mode
                   and s.sparse and s.info.numel >= cfg.min_numel]
    if unconverted:
        warnings.warn(
            f"sparse_compile.optimize: {len(unconverted)} sparse layer(s) not converted to the requested form "
            f"(see the report for why): {', '.join(unconverted[:8])}{' ...' if len(unconverted) > 8 else ''}",
            stacklevel=4,
        )
    if auto:
        _autotune(gm, slots, auto, decisions, cfg, inputs, dev, dtype, cache)
    for s in slots:
        d = decisions[s.name]
        d.padded = d.form == "condensed" and not s.info.constant_fan_in
        if s.in_leaf and d.form != "dense":
            d.reason += f"; swapped in place inside {s.in_leaf} (FX does not trace into it)"
        if d.form == "condensed" and s.kind == "conv2d" and s.module.groups == s.module.in_channels > 1:
            d.reason += ("; depthwise: condensed as asked, but dense is often faster at fan-in 1-2 "
                         "(bench/grouped_conv.py); mode 'auto' measures it")
    return decisions


class _Provisional(fx.Interpreter):
    """Runs a traced model with some ``call_module`` targets replaced (nothing is installed)."""

    def __init__(self, gm, swap: dict):
        super().__init__(gm)
        self.swap = swap

    def call_module(self, target, args, kwargs):
        """The swapped module for ``target`` when there is one, else the model's own."""
        if target in self.swap:
            return self.swap[target](*args, **kwargs)
        return super().call_module(target, args, kwargs)


def _capture_inputs(gm, slots, auto, decisions, cfg, inputs) -> dict:
    """Layer name -> its input in the rewritten model (first call), for the ``auto`` layers."""
    samples: dict = {}

    def grab(name):
        def take(x):
            if name not in samples and isinstance(x, Tensor):
                samples[name] = x.detach().clone()

        return take

    auto_names = {s.name for s in auto}
    swap, hooks = {}, []
    for s in slots:
        d = decisions[s.name]
        if s.node is None:  # inside a leaf (or untraced): the original layer computes the same
            if s.name in auto_names:
                take = grab(s.name)
                hooks.append(s.module.register_forward_pre_hook(lambda m, a, take=take: take(a[0]) if a else None))
            continue
        if s.name not in auto_names and d.form == "dense" and not s.changed:
            continue  # stays the original module
        if d.module is None:
            d.module = FORMS[d.form].build(s, cfg)
        placed = _placed(s, d.module, d.form)
        swap[str(s.node.target)] = _reading(placed, grab(s.name)) if s.name in auto_names else placed
    try:
        with torch.no_grad():
            if isinstance(gm, fx.GraphModule):
                _Provisional(gm, swap).run(*inputs)
            else:
                gm(*inputs)
    except Exception:  # noqa: BLE001 - a layer that cannot be swapped; verification finds it (exact.py)
        pass
    finally:
        for h in hooks:
            h.remove()
    return samples


def _reading(module, take):
    """``module``'s call, handing its first argument to ``take`` first."""
    def run(*args, **kwargs):
        if args:
            take(args[0])
        return module(*args, **kwargs)

    return run


def _autotune(gm, slots, auto, decisions, cfg, inputs, dev, dtype, cache) -> None:
    samples = _capture_inputs(gm, slots, auto, decisions, cfg, inputs)
    rtol = cfg.rtol if cfg.rtol is not None else _default_rtol(dtype, layer=True)
    ticker = Ticker("auto: timing the forms of layer", len(auto))
    for i, s in enumerate(auto):
        ticker.tick(i, s.name)
        d = decisions[s.name]
        x = samples.pop(s.name, None)
        if x is None:
            d.reason = "not reached by the example inputs; kept " + d.form
            continue
        _autotune_slot(s, d, x, cfg, dev, dtype, cache, rtol)
    ticker.close()


def time_form(form: str, placed: nn.Module, x: Tensor, dev, cfg: OptimizeConfig) -> float:
    """Seconds of one call of ``placed`` (``form``'s module, scatter included) on ``x``: "auto"'s
    per-layer timer (``cfg.repeats`` after ``cfg.warmup``). The seam tests replace to make the
    per-layer choice deterministic."""
    return time_call(lambda: placed(x), dev, cfg.repeats, cfg.warmup)


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


def _autotune_slot(s: LayerPlan, d: Decision, x: Tensor, cfg, dev, dtype, cache, rtol) -> None:
    """Time ``d.candidates`` on ``x`` and make ``d`` the fastest exact one."""
    why_not = d.why_not
    base = _baseline(s)
    base_mod = d.module if d.module is not None else FORMS[base].build(s, cfg)
    with torch.no_grad():
        ref = copy.deepcopy(_placed(s, base_mod, base)).to(torch.float64)(x.to(torch.float64))
    times, errs, mods = {}, {}, {}
    for f in d.candidates:
        mod = base_mod if f == base else FORMS[f].build(s, cfg)
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
            t = time_form(f, placed, x, dev, cfg)
            cache.put(key, t)
        times[f] = t
        mods[f] = mod
    best = min(times, key=times.get)
    d.form, d.module, d.rel_err = best, mods[best], errs[best]
    d.times_us = {f: round(t * 1e6, 2) for f, t in times.items()}
    ranked = sorted(times, key=times.get)
    if len(ranked) > 1:
        d.reason = f"fastest: {times[ranked[1]] / times[best]:.2f}x faster than {ranked[1]}"
    else:
        d.reason = "only exact form"
    if why_not:
        d.reason += " (" + "; ".join(f"{f}: {w}" for f, w in why_not.items()) + ")"
