"""Removal of ablated neurons and its propagation through their consumers (the ablated-dense pass).

An ablated neuron's output is not zero but a constant: its bias, then whatever elementwise ops follow
(BatchNorm in eval, activations, dropout, pooling). Some Linear / Conv2d nodes of an FX graph (the
*producers*) are told to output only their active neurons; each reduced tensor is followed forward
with the coupling rules of :mod:`.rules` (the way Torch-Pruning does) until a layer absorbs it (its
matching input columns go, its bias takes the constants' contribution) or a consumer needs the full
width back (residual adds, concat, LayerNorm, reshapes into heads, the graph output, a layer that is
not rewritten): a :class:`~sparse_compile.compiler.modules.ConstantScatter` inserted before it
restores it, so the rewritten graph computes exactly what the original did.

One pass over the graph, :func:`analyse`, changes nothing: it returns a :class:`Propagation`, the
edits in graph order and the producers whose reduction some layer absorbs (``useful``; a reduction
that is only ever restored costs a scatter and saves nothing). :meth:`Propagation.apply` then makes
the edits of the producers kept. :func:`propagate_plan` does both for a :class:`~.plan.Plan`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..fx import set_submodule
from .modules import ConstantScatter
from .plan import Plan, _absorbs, _producer_state
from .rules import (ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, NeedFull, Reduced, _describe,
                    _meta_dtype, _nodes_in, consume, slice_batchnorm)

__all__ = ["Reduced", "Restore", "PropagationResult", "Propagation", "analyse", "propagate", "propagate_plan",
           "ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS"]


@dataclass
class Restore:
    """Where the full width had to be restored, and why (for the report)."""

    node: str  # the reduced node
    user: str  # the consumer that needed the full width
    reason: str


@dataclass
class PropagationResult:
    """What applying a :class:`Propagation` did."""

    absorbed: dict = field(default_factory=dict)  # layer node name -> Reduced (its input)
    restores: list = field(default_factory=list)  # [Restore]
    useful: set = field(default_factory=set)  # producers whose reduction reached an absorbing layer


@dataclass
class _Edit:
    """One change the propagation makes, for the reduction of producer ``origin``.

    kind "restore": a scatter restores ``x`` (a reduced node) for consumer ``node``; when several
    reduced tensors meet at ``node`` (``shared``), ``alone`` is the reason had only this one been
    reduced. kind "absorb": layer ``node`` drops ``state``'s columns. kind "batchnorm": BatchNorm
    ``node`` keeps only ``state.keep``'s channels.
    """

    kind: str
    node: fx.Node
    origin: str
    state: Optional[Reduced] = None
    x: Optional[fx.Node] = None
    reason: str = ""
    later_users: bool = False
    shared: tuple = ()
    alone: str = ""


@dataclass
class Propagation:
    """The outcome of :func:`analyse`: the edits in graph order, nothing changed yet."""

    edits: list = field(default_factory=list)
    useful: set = field(default_factory=set)  # producers whose reduction some layer absorbs

    def apply(self, gm: fx.GraphModule, dtype: torch.dtype = torch.float32, device=None,
              only: Optional[set] = None) -> PropagationResult:
        """Make the edits of the producers named in ``only`` (all when None) in ``gm``, in place:
        insert the :class:`ConstantScatter` restores (named ``sc_restore_<node>``) and slice the
        BatchNorms. The caller rebuilds each absorbing layer from ``result.absorbed[node.name]``."""
        res = PropagationResult()
        kept = (lambda o: True) if only is None else (lambda o: o in only)  # noqa: E731
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        restored: dict = {}
        for e in self.edits:
            if not kept(e.origin):
                continue
            if e.kind == "absorb":
                res.absorbed[e.node.name] = e.state
                res.useful.add(e.origin)
            elif e.kind == "batchnorm":
                set_submodule(gm, e.node.target, slice_batchnorm(gm.get_submodule(e.node.target), e.state.keep))
            else:
                reason = e.reason
                if e.shared and sum(kept(o) for o in e.shared) < 2:
                    reason = e.alone  # the other reduced tensors met here are not reduced after all
                res.restores.append(Restore(e.x.name, e.node.name, reason))
                _restore(gm, e, restored, order, dtype, device)
        gm.graph.lint()
        gm.recompile()
        return res


def _restore(gm, e: _Edit, restored: dict, order: dict, dtype, device) -> None:
    x, user, s = e.x, e.node, e.state
    if x not in restored:
        name = f"sc_restore_{x.name}"
        fill = s.const.to(dtype=_meta_dtype(x, dtype), device=device)
        idx = torch.nonzero(s.keep).flatten().to(device)
        gm.add_submodule(name, ConstantScatter(s.dim, idx, fill))
        with gm.graph.inserting_after(x):
            r = gm.graph.call_module(name, (x,))
        restored[x] = r
        if "tensor_meta" in x.meta:
            r.meta["tensor_meta"] = x.meta["tensor_meta"]
    user.replace_input_with(x, restored[x])
    if e.later_users:
        for u in list(x.users):
            if u is not restored[x] and order.get(u, -1) > order[user]:
                u.replace_input_with(x, restored[x])


def analyse(gm: fx.GraphModule, producers: dict,
            absorbs: Callable[[fx.Node, Reduced], Optional[str]]) -> Propagation:
    """Follow the output reductions of ``producers`` through ``gm``, changing nothing.

    ``producers`` maps Linear/Conv2d nodes (whose modules will output only their kept neurons) to
    their :class:`Reduced` state. ``absorbs(node, state)`` is asked for every Linear/Conv2d node fed
    by a reduced tensor: None when it will drop those input columns, else the reason it cannot.
    """
    out = Propagation()
    state: dict = {}
    uses: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            uses[n.target] = uses.get(n.target, 0) + 1

    def origin(x) -> str:
        (o,) = state[x].origin  # a reduced tensor carries one producer's reduction (meeting ones restore)
        return o

    for node in list(gm.graph.nodes):
        reduced_in = list(dict.fromkeys(a for a in _nodes_in((node.args, node.kwargs)) if a in state))
        new_state = None
        if node.op == "output":
            for x in reduced_in:
                out.edits.append(_Edit("restore", node, origin(x), state[x], x, "graph output"))
        elif len(reduced_in) == 1:
            x = reduced_in[0]
            try:
                new_state, edit = consume(gm, node, x, state[x], uses, absorbs)
            except NeedFull as e:
                out.edits.append(_Edit("restore", node, origin(x), state[x], x, str(e), e.later_users))
                if e.later_users:
                    # apply() hands every later user the restored tensor (an in-place op mutated x):
                    # from here on x is full width, so no later layer may absorb its reduction.
                    del state[x]
            else:
                if edit is not None:
                    out.edits.append(_Edit(edit[0], node, origin(x), edit[1] if edit[0] == "absorb" else
                                           Reduced(state[x].dim, edit[1], state[x].const)))
                    if edit[0] == "absorb":
                        out.useful.add(origin(x))
        elif len(reduced_in) > 1:
            shared = tuple(origin(x) for x in reduced_in)
            for x in reduced_in:
                out.edits.append(_Edit("restore", node, origin(x), state[x], x,
                                       f"{_describe(gm, node)} combines several reduced tensors", shared=shared,
                                       alone=_alone(gm, node, x, state[x], uses, absorbs)))
        if node in producers:
            p = producers[node]
            new_state = Reduced(p.dim, p.keep, p.const, frozenset([node.name]))
        if new_state is not None:
            state[node] = new_state
    return out


def _alone(gm, node, x, s: Reduced, uses: dict, absorbs) -> str:
    """Why ``node`` would restore ``x`` were it the only reduced tensor ``node`` reads."""
    try:
        consume(gm, node, x, s, uses, absorbs)
    except NeedFull as e:
        return str(e)
    # Not reached by any rule today (each one that accepts a tensor refuses a second reduced
    # operand); should one, restoring stays exact, it only saves less.
    return f"{_describe(gm, node)} also reads another reduced tensor"


def propagate(gm: fx.GraphModule, producers: dict, absorbs: Callable[[fx.Node, Reduced], Optional[str]],
              dtype: torch.dtype = torch.float32, device=None, apply: bool = True) -> PropagationResult:
    """:func:`analyse`, then (with ``apply``) :meth:`Propagation.apply` for every producer.

    With ``apply=False`` nothing is changed: the result only says what would happen (``absorbed``,
    ``restores``, ``useful``).
    """
    p = analyse(gm, producers, absorbs)
    if apply:
        return p.apply(gm, dtype, device)
    res = PropagationResult(useful=set(p.useful))
    for e in p.edits:
        if e.kind == "absorb":
            res.absorbed[e.node.name] = e.state
        elif e.kind == "restore":
            res.restores.append(Restore(e.x.name, e.node.name, e.reason))
    return res


def propagate_plan(plan: Plan, dtype: torch.dtype, device) -> None:
    """Reduce every ablated layer of ``plan`` whose removal some consumer absorbs, in one pass.

    A reduction no layer absorbs would only be scattered back: such a layer computes its ablated
    rows (constant) itself instead, which is cheaper for the sparse forms (its ``out_reduce`` is
    cleared). The absorbing layers get their ``in_state``; ``plan.restores`` says where the full
    width came back.
    """
    if not plan.traced:
        return
    producers = {s.node: _producer_state(s) for s in plan.slots if s.node is not None and s.out_reduce}
    if not producers:
        return
    by_node = {s.node: s for s in plan.slots if s.node is not None}
    found = analyse(plan.gm, producers, lambda n, st: _absorbs(plan.gm, by_node.get(n), n, st))
    for s in plan.slots:
        if s.out_reduce and s.node.name not in found.useful:
            s.out_reduce = False
    if not found.useful:
        return
    res = found.apply(plan.gm, dtype, device, only=found.useful)
    plan.restores = [asdict(r) for r in res.restores]
    for s in plan.slots:
        if s.node is not None and s.node.name in res.absorbed:
            s.in_state = res.absorbed[s.node.name]
