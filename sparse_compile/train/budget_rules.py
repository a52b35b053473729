"""Opt-in SRigL rules that stop wasting the weight budget (beyond the paper; see :class:`~sparse_compile.SRigL`).

At high sparsity the paper's rule keeps two kinds of useless weights (measured on LeNet-300-100 at
99%: about a quarter of the budget of the hidden layers):

* **dead ends**: a neuron whose output no live weight of the next sparse layer reads still keeps its
  ``k`` incoming weights. :func:`dead_end_rows` finds such neurons; ``ablate_dead_ends=True``
  ablates them, so their budget goes to neurons whose output is used.
* **zero-gradient regrowth**: a neuron that must regrow ``k - kept`` weights takes positions with
  exactly zero dense gradient (e.g. pixels constant over the data) when it has too few others; those
  weights never move. With ``skip_zero_grad=True`` such positions are not regrown, and
  :func:`ablate_unfillable` ablates the neurons that cannot reach ``k`` with kept weights plus
  non-zero-gradient positions, as far as that lets the layer hold more such weights.

"Outgoing weights" follow the FX graph from a layer's output to the sparse layers that read it,
through activations, BatchNorm, pooling and flatten, with the coupling rules of the ablated-dense
pass (:func:`sparse_compile.compiler.propagate.propagate`); a layer whose output reaches anything else
(a residual add, a concat, the graph output, a dense layer) is never judged by this rule.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["Edge", "trace_edges", "dead_end_rows", "ablate_unfillable", "min_active"]


@dataclass(frozen=True)
class Edge:
    """Producer neuron ``j`` feeds columns ``[j * cols, (j + 1) * cols)`` of ``consumer``'s ``[out, fan-in]``
    weight view (``cols`` is ``H*W`` after a flatten, ``kh*kw`` into a conv, 1 Linear to Linear)."""

    consumer: str
    cols: int


def _placeholder_values(gm, inner: nn.Module, args: tuple, kwargs: dict) -> list:
    sig = inspect.signature(inner.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return [bound.arguments[str(n).lstrip("*")] for n in names]


def trace_edges(model: nn.Module, layers: list, args: tuple, kwargs: dict, leaf_modules=()) -> dict:
    """Producer layer name -> [:class:`Edge`] for every sparse layer whose output only reaches the given
    sparse layers (through elementwise ops, BatchNorm, pooling, flatten).

    ``layers`` are the trainer's managed layers (``_Layer`` objects); ``args``/``kwargs`` one real
    input, used once to learn the shapes (the model runs in eval mode under ``no_grad`` for it, so
    BatchNorm statistics do not move). Layers absent from the result are not judged.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    from .discovery import unwrap
    from ..compiler.propagate import Reduced, propagate
    from ..fx import trace

    inner, _ = unwrap(model)
    gm = trace(inner, leaf_modules)
    by_module = {}
    for layer in layers:
        if layer.target.param_name == "weight":
            for name, mod in inner.named_modules():
                if mod is layer.target.module:
                    by_module[name] = layer
    flags = {m: m.training for m in inner.modules()}
    try:
        for m in flags:
            m.training = False  # dropout is then elementwise, BN uses (and keeps) its running stats
        with torch.no_grad():
            ShapeProp(gm).propagate(*_placeholder_values(gm, inner, args, kwargs))
        calls: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls.setdefault(str(n.target), []).append(n)
        edges: dict = {}
        for path, layer in by_module.items():
            nodes = calls.get(path, [])
            if len(nodes) != 1 or layer.target.head:
                continue
            node = nodes[0]
            shape = getattr(node.meta.get("tensor_meta"), "shape", None)
            out = layer.out
            dim = 1 if isinstance(layer.target.module, nn.Conv2d) else (len(shape) - 1 if shape else -1)
            found: list = []

            def absorbs(cnode, s, out=out, found=found):
                c = by_module.get(str(cnode.target))
                if c is None or len(calls.get(str(cnode.target), [])) != 1:
                    return "not a managed sparse layer"
                mod = c.target.module
                if s.width % out:
                    return "width is not a multiple of the producer's"
                if isinstance(mod, nn.Linear):
                    if s.width != mod.in_features:
                        return "unexpected width"
                    found.append(Edge(c.name, s.width // out))
                    return None
                if isinstance(mod, nn.Conv2d) and mod.groups == 1 and s.dim == 1 and s.width == mod.in_channels:
                    found.append(Edge(c.name, (s.width // out) * mod.kernel_size[0] * mod.kernel_size[1]))
                    return None
                return "grouped conv or unexpected layout"

            producers = {node: Reduced(dim, torch.zeros(out, dtype=torch.bool), torch.zeros(out, dtype=torch.float64))}
            res = propagate(gm, producers, absorbs, apply=False)
            if not res.restores and found:
                edges[layer.name] = found
    finally:
        for m, t in flags.items():
            m.training = t
    return edges


def dead_end_rows(edges: list, masks: dict, out: int) -> Optional[torch.Tensor]:
    """Bool ``[out]``: True for a neuron none of whose outgoing columns is live in any consumer mask
    (``masks``: consumer name -> bool mask, the consumer's new mask when already decided)."""
    live = None
    for e in edges:
        m = masks[e.consumer]
        cols = m.reshape(m.shape[0], -1)
        if cols.shape[1] != out * e.cols:
            return None  # layout changed since tracing: do not judge
        used = cols.reshape(cols.shape[0], out, e.cols).any(dim=2).any(dim=0)
        live = used if live is None else live | used
    return None if live is None else ~live


def ablate_unfillable(active: torch.Tensor, keep: torch.Tensor, ag: torch.Tensor, budget: int,
                      min_active: int) -> torch.Tensor:
    """``active`` without the neurons whose ablation lets the layer hold more useful weights.

    A neuron can hold ``cap = kept + non-zero-gradient positions`` weights without regrowing a
    zero-gradient position. With ``n`` active neurons the fan-in is ``k = budget // n`` and the layer
    holds ``useful(n) = sum over the n best-filled neurons of min(cap, k)`` such weights. The kept
    count is the ``n`` (at least ``min_active``, the dense-fan-in safeguard) that maximises it, the
    largest such ``n`` on a tie; the neurons dropped are the worst-filled (highest index first among
    ties). Ablating one neuron only raises ``k`` for the others, so ablation stops where they could
    not use it either: ablating "until every neuron can fill ``k``" instead runs away on a small
    input pool (every ablation raises ``k`` past the next neuron's candidates, down to one neuron:
    measured on Fashion-MNIST's small CNN at 99%). Active neurons still short of ``k`` regrow
    zero-gradient positions for the rest.
    """
    rows = torch.nonzero(active).flatten()
    n_act = rows.numel()
    if n_act <= max(min_active, 1):
        return active.clone()
    cap = (torch.count_nonzero(keep, dim=1) + torch.count_nonzero(~keep & (ag > 0), dim=1))[rows]
    order = torch.sort(-cap, stable=True).indices  # best-filled first, lowest index first among ties
    caps = cap[order].to(torch.int64)
    prefix = torch.cat([caps.new_zeros(1), torch.cumsum(caps, 0)])
    ns = torch.arange(max(min_active, 1), n_act + 1, device=caps.device)
    k = budget // ns
    # Neurons whose cap reaches k form a prefix of the sorted caps: p of them, counted k each.
    p = torch.searchsorted(-caps, -k, right=True)
    full = torch.minimum(p, ns)
    useful = k * full + prefix[ns] - prefix[full]
    best = int(ns[useful.numel() - 1 - int(torch.argmax(useful.flip(0)))])  # largest n on a tie
    out = active.clone()
    out[rows[order[best:]]] = False
    return out


def warn_untraced(method: str, why: str) -> None:
    """The dead-end rule cannot run: say why once (the paper's rule still applies)."""
    warnings.warn(f"{method}: ablate_dead_ends is off for this run: {why}", stacklevel=4)


def min_active(budget: int, fan: int) -> int:
    """Fewest active neurons that keep the fan-in within the dense fan-in."""
    return -(-budget // fan) if fan else 1



def install_edge_tracing(trainer, leaf_modules=()) -> None:
    """Learn ``trainer``'s producer -> consumer edges at the model's first forward (shapes need an input).

    A forward pre-hook on the (unwrapped) model runs :func:`trace_edges` once and removes itself;
    until then, and for a model FX cannot trace, the dead-end rule judges no layer.
    """
    from .discovery import unwrap

    if not trainer.discovery.traced:
        warn_untraced(trainer.method, "the model could not be FX-traced, so consumers are unknown")
        return
    inner, _ = unwrap(trainer.model)

    def hook(module, args, kwargs):
        if trainer._edge_hook is not None:
            trainer._edge_hook.remove()
            trainer._edge_hook = None
        try:
            trainer._edges = trace_edges(trainer.model, trainer._layers, args, kwargs, leaf_modules)
        except Exception as e:  # shape propagation runs user code: any failure only disables the rule
            warn_untraced(trainer.method, f"learning the graph's shapes failed ({type(e).__name__}: {e})")
        return None

    trainer._edge_hook = inner.register_forward_pre_hook(hook, with_kwargs=True)


def layer_dead_ends(trainer, layer) -> Optional[torch.Tensor]:
    """Dead-end neurons of ``layer`` now (bool ``[out]``), or None when the layer is not judged.

    Reads each consumer's new mask when this update already decided it (consumers go first), else its
    current mask."""
    edges = trainer._edges.get(layer.name)
    if not edges:
        return None
    by_name = {x.name: x for x in trainer._layers}
    if any(e.consumer not in by_name for e in edges):
        return None
    masks = {e.consumer: trainer._fresh.get(e.consumer, by_name[e.consumer].mask) for e in edges}
    dead = dead_end_rows(edges, masks, layer.out)
    return None if dead is None else dead.to(layer.mask.device)
