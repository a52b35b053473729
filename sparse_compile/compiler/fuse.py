"""Fuse a ReLU into the condensed conv before it (after the rewrite).

``CondensedConv2d -> ReLU`` becomes one ``CondensedConv2d(activation="relu")``, whose CPU kernel
applies ReLU as it stores the outputs instead of a second pass over them (ResNet-50: 32 of its 49
ReLUs; the rest follow a residual add or the dense stem). With BatchNorm folded first
(:mod:`.fold`), ``conv -> bn -> relu`` is this pattern too. Only where it is the same function:
the conv is called once and its output goes to that ReLU alone; the ReLU is ``nn.ReLU`` (no hooks),
``torch.relu`` / ``F.relu`` or ``.relu()`` / ``.relu_()`` on that output. (GELU after a condensed
linear layer was tried the same way and measured no faster: GELU is bound by its arithmetic.)
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..fx import called_once, has_any_hook
from .modules import CondensedConv2d

__all__ = ["fuse_relus"]

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_RELU_METHODS = ("relu", "relu_")


def _relu_of(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> bool:
    if not user.args or user.args[0] is not node or len(user.args) > 1:
        return False
    if user.op == "call_module":
        m = gm.get_submodule(user.target)
        return type(m) is nn.ReLU and not user.kwargs and not has_any_hook(m)
    if user.op == "call_function":
        return user.target in _RELU_FUNCTIONS and set(user.kwargs) <= {"inplace"}
    return user.op == "call_method" and user.target in _RELU_METHODS and not user.kwargs


def fuse_relus(gm: fx.GraphModule) -> int:
    """Fuse every ``CondensedConv2d -> ReLU`` pair of ``gm`` in place (the ReLU nodes leave the
    graph; the convs get ``activation="relu"``). Returns how many were fused. The caller recompiles
    ``gm`` (the rewrite does, once, after all its changes)."""
    once = called_once(gm)
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in once or len(node.users) != 1:
            continue
        m = gm.get_submodule(node.target)
        if type(m) is not CondensedConv2d or m.activation or has_any_hook(m):
            continue
        user = next(iter(node.users))
        if not _relu_of(gm, user, node):
            continue
        m.activation = "relu"
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        fused += 1
    return fused
