"""Install the chosen decisions into the planned model (with a scatter where active rows go back in place)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from .forms import FORMS
from .modules import ConstantScatter
from .plan import LayerPlan
from .fuse import fuse_relus
from .pooling import swap_max_pools


def _scatter_for(slot: LayerPlan) -> ConstantScatter:
    m = slot.module
    out = slot.info.out_features
    fill = torch.zeros(out, dtype=m.weight.dtype, device=m.weight.device)
    if m.bias is not None:
        fill = m.bias.detach().clone()
    fill[slot.info.active_rows.to(fill.device)] = 0
    return ConstantScatter(1 if slot.kind == "conv2d" else -1, slot.info.active_rows.to(fill.device), fill)


def _placed(slot: LayerPlan, module: nn.Module, form: Optional[str] = None) -> nn.Module:
    """The module to install: ``module``, followed by a scatter when its rows go back in place."""
    if slot.scatters(form or slot.form):
        return nn.Sequential(module, _scatter_for(slot))
    return module


def _install(s: LayerPlan) -> None:
    if s.form != "dense" or s.new_module is not s.module:
        s.install(_placed(s, s.new_module))


def rewrite(gm: nn.Module, slots: list, decisions: dict, cfg) -> nn.Module:
    """Install ``decisions`` (layer name -> :class:`~.choose.Decision`) into ``gm`` in place.

    Each layer's plan records its decision (``form``, ``reason``, ``times``, ``candidates``,
    ``why_not``, ``rel_err``, ``new_module``: what the report reads); a decision without a module
    gets one built by its form's handler. Max-pooling layers become
    :class:`~.pooling.ChannelsLastMaxPool2d` (exact, faster on CPU), and a ReLU after a condensed
    conv is fused into it (:mod:`.fuse`). A traced ``gm`` is recompiled and loses the modules no
    longer called. Returns ``gm``.
    """
    for s in slots:
        d = decisions[s.name]
        s.form, s.reason, s.rel_err = d.form, d.reason, d.rel_err
        s.times, s.candidates, s.why_not = dict(d.times_us), list(d.candidates), dict(d.why_not)
        s.new_module = d.module if d.module is not None else FORMS[d.form].build(s, cfg)
        _install(s)
    swap_max_pools(gm)  # after tracing (the plan's trace is done): exact, see .pooling
    if isinstance(gm, fx.GraphModule):
        fuse_relus(gm)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return gm
