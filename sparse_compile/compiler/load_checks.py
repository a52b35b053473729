"""Load-time checks of a rebuilt model: per-layer structure, direct op calls, the fake-tensor run.

Used by :func:`sparse_compile.compiler.serialize.load` after the allow-list checks of
:mod:`sparse_compile.compiler.load_policy`; everything here raises ``ValueError`` naming the layer or node.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..formats import Condensed
from ..kernels import validate as _kvalidate
from .modules import (
    CONV_ACTIVATIONS,
    CondensedConv2d,
    CondensedLinear,
    ConstantScatter,
    CSRConv2d,
    CSRLinear,
    ExplicitMultiheadAttention,
)
from .load_policy import SC_OPS

__all__ = ["validate_module", "validate_op_node", "dry_run", "is_sc_op", "get_attr"]


def is_sc_op(target) -> bool:
    """Whether a call_function target is one of the public condensed ops."""
    if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    return f"torch.ops:{target}" in SC_OPS


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"sparse_compile.load: layer {where!r}: {msg}")


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def validate_module(name: str, m: nn.Module) -> None:
    """Structural checks of one module's tensors against its attributes (raise ValueError)."""
    if isinstance(m, (CondensedLinear, CondensedConv2d)):
        n = m.values.shape[0] if m.values.dim() >= 1 else -1
        if isinstance(m, CondensedLinear):
            shape = (n, int(m.in_features))
        else:
            shape = (n, int(m.in_channels), *m.kernel_size)
        _check(m.values.dim() == 2, name, f"values must be 2-D, got shape {_shape(m.values)}")
        if isinstance(m, CondensedConv2d):
            _check(m.activation in CONV_ACTIVATIONS, name,
                   f"activation must be one of {CONV_ACTIVATIONS}, got {m.activation!r}")
        _check(int(m.out_features if isinstance(m, CondensedLinear) else m.out_channels) == n, name,
               f"{n} condensed rows but the layer declares {m.out_features if isinstance(m, CondensedLinear) else m.out_channels}")
        Condensed.from_tensors(m.values.detach(), m.indices, torch.arange(n, dtype=torch.int64), shape,
                               None if m.bias is None else m.bias.detach(), name=name)
        fan = shape[1] if len(shape) == 2 else shape[1] * shape[2] * shape[3]
        try:  # also primes the per-tensor cache the kernels' O(1) per-call check reads
            _kvalidate.check_fan_in(m.indices, fan, f"layer {name!r}")
        except (TypeError, ValueError) as e:
            raise ValueError(f"sparse_compile.load: {e}") from None
        _check(m.bias is None or m.bias.dtype == m.values.dtype, name, "bias dtype differs from values dtype")
    elif isinstance(m, ConstantScatter):
        idx, fill = m.index, m.fill
        _check(idx.dtype == torch.int64 and idx.dim() == 1, name, f"index must be 1-D int64, got {idx.dtype} {_shape(idx)}")
        _check(fill.dim() == 1, name, f"fill must be 1-D, got shape {_shape(fill)}")
        if idx.numel():
            _check(int(idx.min()) >= 0 and int(idx.max()) < fill.numel(), name,
                   f"index out of range [0, {fill.numel()}): min {int(idx.min())}, max {int(idx.max())}")
            _check(bool((idx[1:] > idx[:-1]).all()), name, "index must be strictly increasing")
    elif isinstance(m, (CSRLinear, CSRConv2d)):
        crow, col, val = m.crow_indices, m.col_indices, m.values
        _check(crow.dim() == 1 and crow.numel() == m.n_rows + 1, name,
               f"crow_indices has shape {_shape(crow)}, expected ({m.n_rows + 1},)")
        _check(crow.dtype in (torch.int32, torch.int64) and col.dtype == crow.dtype, name, "CSR index dtypes must match (int32/int64)")
        _check(col.dim() == 1 and val.dim() == 1 and col.numel() == val.numel(), name, "col_indices / values shapes differ")
        _check(int(crow[0]) == 0 and int(crow[-1]) == val.numel() and bool((crow[1:] >= crow[:-1]).all()), name,
               "crow_indices must start at 0, be non-decreasing and end at nnz")
        if col.numel():
            _check(int(col.min()) >= 0 and int(col.max()) < m.n_cols, name,
                   f"column index out of range [0, {m.n_cols}): min {int(col.min())}, max {int(col.max())}")
        fan = m.in_features if isinstance(m, CSRLinear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        _check(m.n_cols == fan, name, f"{m.n_cols} CSR columns but the layer's fan-in is {fan}")
        _check(m.bias is None or _shape(m.bias) == (m.n_rows,), name, f"bias shape {_shape(m.bias)} != ({m.n_rows},)")
    elif isinstance(m, nn.Linear):
        _check(_shape(m.weight) == (m.out_features, m.in_features), name,
               f"weight shape {_shape(m.weight)} != ({m.out_features}, {m.in_features})")
        _check(m.bias is None or _shape(m.bias) == (m.out_features,), name, f"bias shape {_shape(m.bias)}")
    elif isinstance(m, nn.Conv2d):
        exp = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        _check(_shape(m.weight) == exp, name, f"weight shape {_shape(m.weight)} != {exp}")
        _check(m.bias is None or _shape(m.bias) == (m.out_channels,), name, f"bias shape {_shape(m.bias)}")
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        c = (m.num_features,)
        for t in ("weight", "bias", "running_mean", "running_var"):
            v = getattr(m, t, None)
            _check(v is None or _shape(v) == c, name, f"{t} shape {_shape(v)} != {c}")
    elif isinstance(m, nn.LayerNorm):
        for t in ("weight", "bias"):
            v = getattr(m, t, None)
            _check(v is None or _shape(v) == tuple(m.normalized_shape), name,
                   f"{t} shape {_shape(v)} != {tuple(m.normalized_shape)}")
    elif isinstance(m, ExplicitMultiheadAttention):
        e = m.embed_dim
        _check(m.num_heads > 0 and e % m.num_heads == 0, name, "embed_dim must divide into num_heads")
        if m.same_embed_dim:
            _check(_shape(m.in_proj_weight) == (3 * e, e), name, f"in_proj_weight shape {_shape(m.in_proj_weight)}")
        _check(m.in_proj_bias is None or _shape(m.in_proj_bias) == (3 * e,), name, "in_proj_bias shape")


def _fan_in_of(x, kernel_size=None) -> int:
    return int(x.shape[-1]) if kernel_size is None else int(x.shape[1]) * kernel_size[0] * kernel_size[1]


def _width_hook(name: str):
    """Forward pre-hook: the real input width at this layer must cover its indices (the file's
    declared ``in_features`` is not enough: the indices must fit what the model actually feeds)."""
    def hook(m, args):
        x = args[0]
        ks = m.kernel_size if isinstance(m, CondensedConv2d) else None
        fan = _fan_in_of(x, ks)
        declared = m.in_features if ks is None else m.in_channels * ks[0] * ks[1]
        if fan != declared:
            raise ValueError(f"layer {name!r} receives a fan-in of {fan} but declares {declared}")
        _kvalidate.check_fan_in(m.indices, fan, f"layer {name!r}")
    return hook


class _OpCheckInterpreter(fx.Interpreter):
    """Runs the graph, checking each direct condensed-op call's (real) indices against its (fake)
    input's width, as the layer check does for condensed modules."""

    def call_function(self, target, args, kwargs):
        if is_sc_op(target) and len(args) >= 3:
            conv = "conv2d" in str(target)
            ks = None
            if conv:
                k = args[4] if len(args) > 4 else kwargs.get("kernel_size", (1, 1))
                ks = (k, k) if isinstance(k, int) else tuple(k)
            _kvalidate.check_fan_in(args[2], _fan_in_of(args[0], ks), f"node calling {target}")
        return super().call_function(target, args, kwargs)


def dry_run(gm: nn.Module, inputs: list) -> None:
    """Run the model once on fake tensors of the recorded input shapes: any shape fault surfaces here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            args = []
            for i in inputs:
                if "shape" in i:
                    dt = getattr(torch, str(i["dtype"]), None)
                    if not isinstance(dt, torch.dtype):
                        raise ValueError(f"bad example input dtype {i['dtype']!r}")
                    args.append(torch.empty([int(s) for s in i["shape"]], dtype=dt))
                else:
                    from .serialize import _dec  # serialize imports this module

                    args.append(_dec(i.get("value")))
            hooks = [m.register_forward_pre_hook(_width_hook(name)) for name, m in gm.named_modules()
                     if isinstance(m, (CondensedLinear, CondensedConv2d))]
            try:
                with torch.no_grad():
                    if isinstance(gm, fx.GraphModule) and any(
                            n.op == "call_function" and is_sc_op(n.target) for n in gm.graph.nodes):
                        _OpCheckInterpreter(gm).run(*args)
                    else:
                        gm(*args)
            finally:
                for h in hooks:
                    h.remove()
        del mode
    except ValueError as e:
        raise ValueError(f"sparse_compile.load: the model fails on its recorded input shapes: {e}") from None
    except Exception as e:  # a shape mismatch inside a layer: say where, never crash later in a kernel
        raise ValueError(
            f"sparse_compile.load: the model fails on its recorded input shapes ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def validate_op_node(n: fx.Node, root: nn.Module) -> None:
    """A graph node calling a condensed op directly: its weights must be file tensors, checked like
    a condensed module's (the op re-checks the indices against the real input width per call)."""
    where = f"node {n.name!r}"
    names = ("x", "values", "indices", "bias")
    args = dict(zip(names, n.args))
    args.update({k: v for k, v in n.kwargs.items() if k in names})
    got = {}
    for k in ("values", "indices", "bias"):
        a = args.get(k)
        if k == "bias" and a is None:
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            raise ValueError(f"sparse_compile.load: {where} ({n.target}): {k} must be a tensor stored in the file")
        got[k] = get_attr(root, a.target)
    v, i = got["values"], got["indices"]
    _check(isinstance(v, Tensor) and v.dim() == 2 and v.is_floating_point(), where, "values must be a 2-D float tensor")
    _check(isinstance(i, Tensor) and i.shape == v.shape and i.dtype in (torch.int16, torch.int32), where,
           "indices must be int16/int32 of values' shape")
    b = got.get("bias")
    _check(b is None or isinstance(b, Tensor) and tuple(b.shape) == (v.shape[0],), where, "bias shape must be (n,)")
    try:
        _kvalidate.index_max(i, where)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sparse_compile.load: {e}") from None


def get_attr(root: nn.Module, target: str):
    """``root``'s attribute at the dotted path ``target`` (AttributeError naming the missing part)."""
    obj = root
    for p in target.split("."):
        if not hasattr(obj, p):
            raise AttributeError(f"no attribute {p!r}")
        obj = getattr(obj, p)
    return obj
