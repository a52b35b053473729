"""FX tracing shared by the trainer and the compiler, with timm's and torchvision's leaf helpers."""
from __future__ import annotations

import operator
from collections import Counter
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

SPARSE_TYPES = (nn.Linear, nn.Conv2d)

# Ops that act elementwise on one tensor (activations, dropout, identity): each channel keeps its
# place, so an ablated neuron's constant output stays one constant. Shared by the compiler's
# propagation rules (sparse_compile.compiler.rules) and the FLOP count (sparse_compile.analysis.flops).
UNARY_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)
UNARY_ELEMENTWISE_FUNCTIONS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid,
    torch.sigmoid, F.tanh, torch.tanh, torch.clamp, torch.clip, torch.neg, torch.abs, torch.exp,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, operator.neg,
})
UNARY_ELEMENTWISE_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "neg", "abs", "exp", "contiguous", "clone",
})


def _timm_notrace():
    try:
        from timm.layers import _fx as tfx  # timm >= 0.9 keeps the registries here
    except Exception:  # timm absent or reorganised: plain FX is still correct, just traces deeper
        return (), ()
    return tuple(tfx.get_notrace_modules()), tuple(tfx.get_notrace_functions())


class Tracer(fx.Tracer):
    """``torch.fx.Tracer`` that keeps timm's no-trace modules as leaves and wraps its no-trace functions.

    Linear and Conv2d are leaves already (every ``torch.nn`` module is), so each appears as one
    ``call_module`` node that a pass can rewrite.
    """

    def __init__(self, leaf_modules: Iterable[type] = (), leaf_if=None):
        mods, funcs = _timm_notrace()
        super().__init__(autowrap_functions=funcs)
        self._leaf_types = tuple(mods) + tuple(leaf_modules)
        self._leaf_if = leaf_if

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if self._leaf_if is not None and self._leaf_if(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaf_modules: Iterable[type] = (), leaf_if=None) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``GraphModule`` (raises what FX raises when it cannot).

    ``leaf_if(module)``: True for further modules FX must call rather than trace into.
    """
    tracer = Tracer(leaf_modules, leaf_if)
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


def set_submodule(root: nn.Module, target: str, m: nn.Module) -> None:
    """Put ``m`` at dotted path ``target`` under ``root`` (replacing what is there)."""
    parent, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, m)


def sparse_module_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """``call_module`` nodes whose target is a Linear or Conv2d, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SPARSE_TYPES):
            out.append(n)
    return out


def output_feeding_modules(gm: fx.GraphModule) -> set[str]:
    """Names of Linear/Conv2d modules whose output reaches the graph output without passing through
    another Linear/Conv2d (the classifier head(s): never to be ablated)."""
    found: set[str] = set()
    out_node: Optional[fx.Node] = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out_node is None:
        return found
    stack, seen = list(out_node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SPARSE_TYPES):
            found.add(str(n.target))
            continue
        stack.extend(n.all_input_nodes)
    return found


def has_any_hook(m: nn.Module) -> bool:
    """Whether ``m`` has any forward, forward-pre or backward hook (pruning's included): a pass that
    changes ``m``'s weights or removes its call must leave such a module alone."""
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


def called_once(gm: fx.GraphModule) -> set[str]:
    """Targets of the modules ``gm`` calls from exactly one node and holds under one name only, so
    that a pass may change what that one call computes."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    names = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
    return {t for t, c in calls.items() if c == 1 and names[id(gm.get_submodule(t))] == 1}
