"""Install the chosen modules into the model (with a scatter where active rows go back in place)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .modules import ConstantScatter
from .plan import LayerPlan


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
