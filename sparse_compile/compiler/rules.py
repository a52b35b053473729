"""The coupling rules of the propagation (:mod:`.propagate`): what each op does to a reduced tensor.

A *reduced* tensor (:class:`Reduced`) holds only the kept channels of its full width; each dropped
channel has one constant value everywhere. For a node consuming one, :func:`consume` says what its
output is (still reduced, with new constants; not reduced; or absorbed by a Linear / Conv2d) or
raises :class:`NeedFull` with the reason the node needs the full width back:

* elementwise ops (activations, Dropout, Identity, arithmetic with Python scalars) keep the
  reduction; the constants go through the same op;
* eval BatchNorm keeps it; the module is replaced by one over the kept channels;
* pooling and means over non-channel dimensions keep it;
* flatten (and a view / reshape that only merges dims from the channel dim on) keeps it (each
  channel becomes ``H*W`` features);
* ``.size(d)`` of another dim and ``.dim()`` read nothing that changed;
* a Linear / Conv2d consumer absorbs it when ``absorbs`` agrees (a Conv2d only when the constants'
  contribution is the same at every position: no padding, or constants that are exactly 0).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..fx import UNARY_ELEMENTWISE_FUNCTIONS, UNARY_ELEMENTWISE_METHODS, UNARY_ELEMENTWISE_MODULES

__all__ = ["Reduced", "NeedFull", "consume", "ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS"]

@dataclass
class Reduced:
    """A tensor that holds only the kept channels along ``dim`` of its original full width.

    ``dim`` is non-negative when the rank is known (from shape metadata, or 1 for a conv output),
    else counted from the end (-1: a Linear output without metadata). ``const`` (float64, full
    width) holds the value every dropped channel has at every position; entries of kept channels
    are unused (0).
    """

    dim: int
    keep: Tensor  # bool [C]
    const: Tensor  # float64 [C]
    origin: frozenset = frozenset()  # names of the producer nodes whose reduction this carries

    @property
    def width(self) -> int:
        """Full width along ``dim``."""
        return int(self.keep.numel())

    @property
    def n_kept(self) -> int:
        """Channels actually present."""
        return int(self.keep.sum())

    def dropped_const(self) -> Tensor:
        """Constants of the dropped channels, in channel order."""
        return self.const[~self.keep]


#: Ops a reduced tensor goes through elementwise: the shared unary ones (:mod:`sparse_compile.fx`)
#: plus arithmetic, which keeps the reduction when its other operand is a Python scalar.
ELEMENTWISE_MODULES = UNARY_ELEMENTWISE_MODULES
_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
ELEMENTWISE_FUNCTIONS = UNARY_ELEMENTWISE_FUNCTIONS | {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div,
}
ELEMENTWISE_METHODS = UNARY_ELEMENTWISE_METHODS | {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow",
}
_POOL_MODULES = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class NeedFull(Exception):
    """Raised by a rule: this consumer needs the full width (message = why).

    ``later_users``: every later user must see the restored tensor too (an in-place op mutates it,
    and whoever reads it afterwards must read the mutated full-width tensor).
    """

    def __init__(self, msg: str, later_users: bool = False):
        super().__init__(msg)
        self.later_users = later_users


def _nodes_in(a) -> list:
    out = []
    fx.node.map_arg(a, lambda n: out.append(n))
    return out


def _meta_shape(node) -> Optional[tuple]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(tm, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _meta_dtype(node, default=torch.float32):
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(tm, "dtype", None) or default


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    return f"{node.name} ({node.op})"


def _is_inplace(gm, node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        return getattr(node.target, "__name__", "").endswith("_") or bool(node.kwargs.get("inplace"))
    return False


def _apply_elementwise(gm, node, x: fx.Node, s: Reduced) -> Reduced:
    """Run the op on the dropped channels' constants (in the graph's dtype, as the model would)."""
    others = [n for n in _nodes_in((node.args, node.kwargs)) if n is not x]
    if others:
        raise NeedFull(f"{_describe(gm, node)} combines it with another tensor")
    if _is_inplace(gm, node) and len(x.users) > 1:
        raise NeedFull(f"{_describe(gm, node)} modifies it in place and it has other users", later_users=True)
    if node.op == "call_function" and node.target in _DROPOUT_FUNCS:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if training is not False:
            raise NeedFull(f"{_describe(gm, node)} is dropout in training mode")
    dtype = _meta_dtype(x)
    c = s.dropped_const().to(dtype)
    sub = lambda a: fx.node.map_arg(a, lambda n: c.clone())  # noqa: E731
    with torch.no_grad():
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if m.training and isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
                raise NeedFull(f"{_describe(gm, node)} is dropout in training mode")
            out = m(c.clone())
        elif node.op == "call_function":
            out = node.target(*sub(node.args), **sub(node.kwargs))
        else:
            args = sub(node.args)
            out = getattr(args[0], node.target)(*args[1:], **sub(node.kwargs))
    if not isinstance(out, Tensor) or out.shape != c.shape:
        raise NeedFull(f"{_describe(gm, node)} is not elementwise on it")
    const = torch.zeros_like(s.const)
    const[~s.keep] = out.to(torch.float64)
    return Reduced(s.dim, s.keep, const, s.origin)


def _rule_batchnorm(gm, node, x, s: Reduced, uses: dict) -> Reduced:
    """Eval BatchNorm over the channel dim: the constants are normalised like the kept channels (the
    module itself is sliced when the reduction is applied, :func:`slice_batchnorm`)."""
    m = gm.get_submodule(node.target)
    if s.dim != 1:
        raise NeedFull(f"{_describe(gm, node)} normalises dim 1 but the reduced dim is {s.dim}")
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise NeedFull(f"{_describe(gm, node)} is not in eval mode with running statistics")
    if uses[node.target] > 1:
        raise NeedFull(f"{_describe(gm, node)} is called at several places")
    drop = ~s.keep.to(m.running_mean.device)
    dtype = _meta_dtype(x)
    with torch.no_grad():
        c = s.dropped_const().to(dtype).reshape(1, -1)
        w = None if m.weight is None else m.weight[drop]
        b = None if m.bias is None else m.bias[drop]
        out = F.batch_norm(c, m.running_mean[drop], m.running_var[drop], w, b, False, 0.0, m.eps)
    const = torch.zeros_like(s.const)
    const[~s.keep] = out.reshape(-1).to(torch.float64)
    return Reduced(s.dim, s.keep, const, s.origin)


def slice_batchnorm(m: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of BatchNorm ``m`` over the channels in ``keep`` only."""
    import copy

    keep = keep.to(m.running_mean.device)
    new = copy.deepcopy(m)
    new.num_features = int(keep.sum())
    with torch.no_grad():
        if m.weight is not None:
            new.weight = nn.Parameter(m.weight[keep].clone(), m.weight.requires_grad)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias[keep].clone(), m.bias.requires_grad)
        new.running_mean = m.running_mean[keep].clone()
        new.running_var = m.running_var[keep].clone()
    return new


def _rule_pool(gm, node, x, s: Reduced) -> Reduced:
    if s.dim != 1:
        raise NeedFull(f"{_describe(gm, node)} pools NCHW but the reduced dim is {s.dim}")
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.AvgPool2d):
            pad = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)
            if (any(pad) and m.count_include_pad) or m.divisor_override:
                raise NeedFull(f"{_describe(gm, node)} averages in padding, so a constant does not stay constant")
    elif node.target is F.avg_pool2d:
        a = list(node.args) + [None] * 8
        pad = node.kwargs.get("padding", a[3] if a[3] is not None else 0)
        cip = node.kwargs.get("count_include_pad", a[5] if a[5] is not None else True)
        div = node.kwargs.get("divisor_override", a[6])
        pad = pad if isinstance(pad, (tuple, list)) else (pad,)
        if (any(pad) and cip) or div:
            raise NeedFull(f"{_describe(gm, node)} averages in padding, so a constant does not stay constant")
    if _nodes_in((node.args[1:], node.kwargs)):
        raise NeedFull(f"{_describe(gm, node)} has tensor arguments")
    return Reduced(1, s.keep, s.const, s.origin)


def _reduce_dims(node) -> Optional[tuple]:
    a = node.args
    dims = node.kwargs.get("dim", a[1] if len(a) > 1 else None)
    keepdim = node.kwargs.get("keepdim", a[2] if len(a) > 2 else False)
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(dims), bool(keepdim)


def _rule_mean(gm, node, x, s: Reduced) -> Reduced:
    shape = _meta_shape(x)
    rd = _reduce_dims(node)
    if shape is None or rd is None or s.dim < 0:
        raise NeedFull(f"{_describe(gm, node)}: reduction over unknown dimensions")
    dims, keepdim = rd
    nd = len(shape)
    dims = {d % nd for d in dims}
    if s.dim in dims:
        raise NeedFull(f"{_describe(gm, node)} reduces over the channel dimension")
    new_dim = s.dim if keepdim else s.dim - sum(1 for d in dims if d < s.dim)
    return Reduced(new_dim, s.keep, s.const, s.origin)


def _flatten_args(gm, node) -> Optional[tuple]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return m.start_dim, m.end_dim
    a = node.args
    start = node.kwargs.get("start_dim", a[1] if len(a) > 1 else 0)
    end = node.kwargs.get("end_dim", a[2] if len(a) > 2 else -1)
    return start, end


def _merge(s: Reduced, shape: tuple, start: int, end: int, gm, node) -> Reduced:
    nd = len(shape)
    start, end = start % nd, end % nd
    d = s.dim
    if d < start:
        return s
    if d > end:
        return Reduced(d - (end - start), s.keep, s.const, s.origin)
    before = 1
    for v in shape[start:d]:
        before *= v
    if before != 1:
        raise NeedFull(f"{_describe(gm, node)} interleaves the channel dimension with others")
    after = 1
    for v in shape[d + 1:end + 1]:
        after *= v
    return Reduced(start, s.keep.repeat_interleave(after), s.const.repeat_interleave(after), s.origin)


def _rule_flatten(gm, node, x, s: Reduced) -> Reduced:
    shape = _meta_shape(x)
    if shape is None or s.dim < 0:
        raise NeedFull(f"{_describe(gm, node)}: flatten without shape information")
    start, end = _flatten_args(gm, node)
    if not isinstance(start, int) or not isinstance(end, int):
        raise NeedFull(f"{_describe(gm, node)}: flatten with dynamic dims")
    return _merge(s, shape, start, end, gm, node)


def _rule_reshape(gm, node, x, s: Reduced) -> Reduced:
    """A view/reshape that only merges a run of dims starting at the channel dim is a flatten."""
    a, b = _meta_shape(x), _meta_shape(node)
    if a is None or b is None or s.dim < 0:
        raise NeedFull(f"{_describe(gm, node)}: reshape without shape information")
    if a == b:
        return s
    for end in range(len(a)):
        for start in range(0, end + 1):
            merged = a[:start] + (_prod(a[start:end + 1]),) + a[end + 1:]
            if merged == b and start <= s.dim:
                return _merge(s, a, start, end, gm, node)
    raise NeedFull(f"{_describe(gm, node)} reshapes the channel dimension")


def _prod(t) -> int:
    p = 1
    for v in t:
        p *= v
    return p


def _plain(m: nn.Module) -> bool:
    """Whether ``m`` computes exactly what its torch.nn class does: a subclass with its own
    ``forward`` (e.g. timm's BatchNormAct2d, which adds an activation, or AvgPool2dSame, which pads
    in forward) or a module with forward hooks is not (the rules would misjudge it)."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    for base in type(m).__mro__:
        if base.__module__.startswith("torch.nn.modules") and "forward" in vars(base):
            return type(m).forward is base.forward
    return False


def _classify(gm, node, x: fx.Node):
    """The rule for ``node`` consuming reduced ``x``: a name, or None (needs full width)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if node.args and node.args[0] is x and _plain(m):
            if isinstance(m, ELEMENTWISE_MODULES):
                return "elementwise"
            if isinstance(m, _BN):
                return "batchnorm"
            if isinstance(m, _POOL_MODULES):
                return "pool"
            if isinstance(m, nn.Flatten):
                return "flatten"
        return None
    if node.op == "call_function":
        t = node.target
        first = node.args[0] if node.args else None
        if t in ELEMENTWISE_FUNCTIONS and (first is x or (len(node.args) > 1 and node.args[1] is x)):
            return "elementwise"
        if first is not x:
            return None
        if t in _POOL_FUNCTIONS:
            return "pool"
        if t is torch.flatten:
            return "flatten"
        if t in (torch.mean, torch.amax, torch.amin):
            return "mean"
        return None
    if node.op == "call_method":
        if not node.args or node.args[0] is not x:
            return None
        name = node.target
        if name in ELEMENTWISE_METHODS:
            return "elementwise"
        if name == "flatten":
            return "flatten"
        if name in ("mean", "amax", "amin"):
            return "mean"
        if name in ("view", "reshape"):
            return "reshape"
        if name == "size":
            return "size"
        if name == "dim":
            return "passive"
    return None


def consume(gm, node, x, s: Reduced, uses: dict, absorbs) -> tuple:
    """What ``node`` does with reduced ``x``: ``(state, edit)``. ``state``: the :class:`Reduced`
    state of ``node``'s output (None: not reduced); ``edit``: None, ``("absorb", s)`` (a
    Linear / Conv2d drops the reduced input columns) or ``("batchnorm", keep)`` (the BatchNorm
    module must be sliced). Raises :class:`NeedFull` when ``node`` needs the full width.
    ``uses``: call_module target -> number of calls in the graph."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Linear, nn.Conv2d)):
        if node.args and node.args[0] is x and len(_nodes_in((node.args, node.kwargs))) == 1:
            why = absorbs(node, s)
            if why is None:
                return None, ("absorb", s)
            raise NeedFull(why)
        raise NeedFull(f"{_describe(gm, node)} takes it in an unexpected position")
    rule = _classify(gm, node, x)
    if rule is None:
        raise NeedFull(f"{_describe(gm, node)} needs the full width")
    if rule == "batchnorm":
        return _rule_batchnorm(gm, node, x, s, uses), ("batchnorm", s.keep)
    if rule in _RULES:
        return _RULES[rule](gm, node, x, s), None
    if rule == "size":
        a = node.args
        d = node.kwargs.get("dim", a[1] if len(a) > 1 else None)
        if isinstance(d, int):
            nd = len(_meta_shape(x) or ())
            if nd and s.dim >= 0 and d % nd != s.dim:
                return None, None
            if s.dim < 0 and d < 0 and d != s.dim:
                return None, None
        raise NeedFull(f"{_describe(gm, node)} reads the channel count")
    if rule == "passive":
        return None, None
    raise NeedFull(f"{_describe(gm, node)} needs the full width")


_RULES = {"elementwise": _apply_elementwise, "pool": _rule_pool, "flatten": _rule_flatten, "mean": _rule_mean,
          "reshape": _rule_reshape}
