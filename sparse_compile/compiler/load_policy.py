"""What :func:`sparse_compile.load` lets a file name: exact functions, tensor methods, module classes.

A saved model's graph is rebuilt by ``torch.fx``, which turns it into Python source and runs it.
So every name that reaches that source must be one we chose, not one the file chose:

* ``call_function`` targets: only the exact ``"module:name"`` references in :data:`ALLOWED_FUNCTIONS`
  (pure tensor / number operations that symbolic tracing of torch, torchvision and timm models
  emits), the functions timm itself registers as trace leaves, and ``torch.ops.sparse_compile``'s
  public condensed ops. ``getattr`` only with a constant attribute name from :data:`ALLOWED_GETATTR`.
* ``call_method`` names: only :data:`ALLOWED_METHODS` (tensor methods without side effects outside
  the tensor: no hooks, no callables, no storage or pointer access).
* module classes: ``nn.Module`` subclasses defined under ``torch.nn.modules``, ``sparse_compile``,
  ``torchvision.models`` / ``torchvision.ops`` and ``timm.layers`` / ``timm.models``. Their
  attributes are plain data (numbers, strings, tuples, dtypes), so a module runs installed code only.
* every name fx writes into source (placeholders, keyword names, attribute / submodule paths, node
  names) must be a plain identifier, so nothing can be smuggled into the generated code.

``trusted=("pkg", ...)`` adds the functions and classes of those packages, for models built from
the user's own code; nothing is trusted by default.
"""
from __future__ import annotations

import importlib
import keyword
import re
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["ALLOWED_FUNCTIONS", "ALLOWED_METHODS", "ALLOWED_GETATTR", "SC_OPS", "resolve_function",
           "resolve_class", "check_graph_spec", "is_identifier_path"]

_OPERATOR = (
    "add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor lshift rshift "
    "eq ne lt le gt ge not_ truth getitem setitem iadd isub imul itruediv ifloordiv imod ipow imatmul"
).split()
_BUILTINS = "getattr len int float bool range tuple list max min abs round sum all any slice".split()
_MATH = "ceil floor sqrt log log2 exp sin cos isqrt prod".split()
# torch.<name> functions (ATen ops and torch's pure Python helpers) that traced models call.
_TORCH = (
    "_assert abs add addcdiv addcmul addmm amax amin arange argmax argmin baddbmm bmm broadcast_to cat "
    "ceil chunk clamp clip concat concatenate conv1d conv2d cos cumsum div einsum eq erf exp flatten flip "
    "floor full full_like gather ge gt index_select layer_norm batch_norm group_norm le linspace log "
    "log_softmax logsumexp lt masked_fill matmul max maximum mean min minimum mm movedim mul narrow ne neg "
    "ones ones_like outer permute pow relu repeat_interleave reshape roll round rsqrt select sigmoid sign "
    "sin softmax split sqrt square squeeze stack std sub sum swapaxes t tanh tensor_split tile topk "
    "transpose unbind unflatten unsqueeze var where zeros zeros_like"
).split()
# torch.functional: Python helpers re-exported as torch.<name>.
_TORCH_FUNCTIONAL = "einsum split meshgrid broadcast_tensors tensordot norm atleast_2d".split()
# torch.nn.functional (Python) and torch._C._nn (C++) names of the same pure ops.
_NN_F = (
    "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool2d avg_pool1d avg_pool2d batch_norm conv1d "
    "conv2d dropout dropout1d dropout2d elu embedding fold gelu glu group_norm hardsigmoid hardswish hardtanh "
    "instance_norm interpolate layer_norm leaky_relu linear log_sigmoid logsigmoid log_softmax max_pool1d "
    "max_pool2d mish normalize one_hot pad relu relu6 rms_norm scaled_dot_product_attention selu sigmoid "
    "silu softmax softplus tanh unfold upsample"
).split()
_TORCHVISION = (
    "torchvision.models.swin_transformer:_get_relative_position_bias",
    "torchvision.models.swin_transformer:_patch_merging_pad",
    "torchvision.models.swin_transformer:shifted_window_attention",
    "torchvision.ops.stochastic_depth:stochastic_depth",
)

#: Exact ``"module:name"`` references a graph may call (plus timm's own trace-leaf functions).
ALLOWED_FUNCTIONS = frozenset(
    [f"_operator:{n}" for n in _OPERATOR] + [f"operator:{n}" for n in _OPERATOR]
    + [f"builtins:{n}" for n in _BUILTINS] + [f"math:{n}" for n in _MATH]
    + [f"torch:{n}" for n in _TORCH] + [f"torch.functional:{n}" for n in _TORCH_FUNCTIONAL]
    + [f"torch.nn.functional:{n}" for n in _NN_F] + [f"torch._C._nn:{n}" for n in _NN_F]
    + list(_TORCHVISION)
)

#: The public condensed ops a graph may call directly (validated like condensed modules).
SC_OPS = frozenset({
    "torch.ops:sparse_compile.condensed_linear", "torch.ops:sparse_compile.condensed_linear.default",
    "torch.ops:sparse_compile.condensed_conv2d", "torch.ops:sparse_compile.condensed_conv2d.default",
})

#: Attribute names ``getattr`` nodes may read (what tracing emits for ``x.shape`` and friends).
ALLOWED_GETATTR = frozenset("shape dtype device ndim T mT is_cuda layout requires_grad real imag".split())

#: Tensor methods a graph may call.
ALLOWED_METHODS = frozenset((
    "abs add add_ addcmul all amax amin any argmax argmin bfloat16 bmm bool ceil chunk clamp clamp_ "
    "clamp_min clip clone contiguous cos cumsum detach dim div div_ double eq erf exp expand expand_as flatten "
    "flip float floor ge gelu gather gt half index_select int le log log_softmax long lt masked_fill "
    "masked_fill_ matmul max maximum mean min minimum mm movedim mul mul_ narrow ne neg new_full new_ones "
    "new_zeros norm numel permute pow reciprocal relu relu_ repeat repeat_interleave reshape reshape_as "
    "roll round rsqrt select sigmoid sigmoid_ sign sin size softmax split sqrt square squeeze std sub sub_ "
    "sum swapaxes t tanh tensor_split tile to topk transpose type_as unbind unflatten unfold unsqueeze var "
    "view view_as where"
).split())

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLASS_PACKAGES = ("torch.nn.modules", "sparse_compile", "torchvision.models", "torchvision.ops",
                   "timm.layers", "timm.models")


# Modules that moved when the package was split into subpackages: files saved before still load.
_MOVED_MODULES = {
    "sparse_compile.layers": "sparse_compile.compiler.modules",
    "sparse_compile.structured": "sparse_compile.compiler.propagate",
    "sparse_compile.tracing": "sparse_compile.fx",
}


def _moved(name: str) -> str:
    """``name`` (a dotted class or module path) at its current place."""
    for old, new in _MOVED_MODULES.items():
        if name.startswith(old + ".") and old != new:
            return new + name[len(old):]
        if name == old:
            return new
    return name


def _under(mod: str, prefixes: Iterable[str]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def is_identifier_path(s, allow_star: bool = False, digits: bool = False) -> bool:
    """Whether ``s`` is ``name`` or ``a.b.c`` of plain ASCII, non-dunder, non-keyword identifiers
    (``digits``: parts may also be decimal numbers, as ``nn.Sequential`` children are)."""
    if not isinstance(s, str) or not s:
        return False
    if allow_star:
        s = s[2:] if s.startswith("**") else s[1:] if s.startswith("*") else s
    return all((_IDENT.fullmatch(p) and not keyword.iskeyword(p) and not p.startswith("__"))
               or (digits and p.isdigit() and p.isascii()) for p in s.split("."))


def _timm_leaf_functions() -> tuple:
    from ..fx import _timm_notrace

    return _timm_notrace()[1]


def _import_attr(mod: str, name: str, ref: str):
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"sparse_compile.load: cannot resolve function {ref!r} ({e})") from None


def resolve_function(ref, trusted: tuple = (), where: str = "a node"):
    """The callable for an allowed ``"module:name"`` reference; ``ValueError`` naming it otherwise."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ValueError(f"sparse_compile.load: {where} has a bad function reference {ref!r}")
    mod, name = ref.split(":")
    if mod == "torch.ops":
        if ref not in SC_OPS:
            raise ValueError(f"sparse_compile.load: {where} calls operator {name!r}, which is not allowed "
                             "(only torch.ops.sparse_compile.condensed_linear / condensed_conv2d)")
        from .. import kernels  # noqa: F401  (registers the ops)

        obj = torch.ops.sparse_compile
        for p in name.split(".")[1:]:
            obj = getattr(obj, p)
        return obj
    if not is_identifier_path(mod) or not is_identifier_path(name) or "." in name:
        raise ValueError(f"sparse_compile.load: {where} has a bad function reference {ref!r}")
    if ref in ALLOWED_FUNCTIONS:
        return _import_attr(mod, name, ref)
    if trusted and _under(mod, trusted):
        obj = _import_attr(mod, name, ref)
        if callable(obj) and not (isinstance(obj, type) and issubclass(obj, BaseException)):
            return obj
    elif _under(mod, ("timm",)):
        obj = _import_attr(mod, name, ref)
        if any(obj is f for f in _timm_leaf_functions()):
            return obj
    raise ValueError(f"sparse_compile.load: {where} calls {ref!r}, which is not an allowed function "
                     "(pass trusted=('package',) only for code you trust)")


def resolve_class(name, trusted: tuple = (), where: str = "a module"):
    """The ``nn.Module`` subclass for an allowed qualified class name; ``ValueError`` otherwise."""
    if name == "torch.nn.modules.module.Module":
        return nn.Module
    if not is_identifier_path(name) or "." not in name:
        raise ValueError(f"sparse_compile.load: {where} has a bad class name {name!r}")
    name = _moved(name)
    if not _under(name.rsplit(".", 1)[0], _CLASS_PACKAGES + tuple(trusted)):
        raise ValueError(f"sparse_compile.load: class {name!r} of {where} is not allowed "
                         "(trusted= extends the list)")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            break
        # The class must live where the name says (no re-exports of foreign classes into an allowed
        # package), be a module, and not carry generated code of its own.
        if (isinstance(obj, type) and issubclass(obj, nn.Module) and not issubclass(obj, torch.fx.GraphModule)
                and _under(obj.__module__, _CLASS_PACKAGES + tuple(trusted))
                and not issubclass(obj, torch.jit.ScriptModule)):
            return obj
        break
    raise ValueError(f"sparse_compile.load: cannot resolve module class {name!r} of {where} "
                     "(not an allowed nn.Module subclass)")


def check_graph_spec(nodes, trusted: tuple = ()) -> dict:
    """Check a graph's node list before anything is built; returns ``{node name: callable}``.

    Raises ``ValueError`` naming the node and target for anything outside the allow-lists.
    """
    if not isinstance(nodes, list):
        raise ValueError("sparse_compile.load: the graph must be a list of nodes")
    fns = {}
    for i, n in enumerate(nodes):
        if not isinstance(n, dict):
            raise ValueError(f"sparse_compile.load: graph node #{i} is not an object")
        op, name, target = n.get("op"), n.get("name"), n.get("target")
        if not is_identifier_path(name) or "." in name:
            raise ValueError(f"sparse_compile.load: graph node #{i} has a bad name {name!r}")
        where = f"node {name!r}"
        if op == "call_function":
            fns[name] = resolve_function(target, trusted, where)
            if target == "builtins:getattr":
                args = n.get("args", {}).get("__tuple__") if isinstance(n.get("args"), dict) else None
                if not (isinstance(args, list) and len(args) == 2 and args[1] in ALLOWED_GETATTR):
                    raise ValueError(f"sparse_compile.load: {where}: getattr is allowed only with a constant "
                                     f"attribute among {sorted(ALLOWED_GETATTR)}")
        elif op == "call_method":
            if target not in ALLOWED_METHODS:
                raise ValueError(f"sparse_compile.load: {where} calls method {target!r}, which is not an "
                                 "allowed tensor method")
        elif op in ("call_module", "get_attr"):
            if not is_identifier_path(target, digits=True):
                raise ValueError(f"sparse_compile.load: {where} has a bad {op} target {target!r}")
        elif op == "placeholder":
            if not is_identifier_path(target, allow_star=True) or "." in target:
                raise ValueError(f"sparse_compile.load: {where} has a bad placeholder name {target!r}")
        elif op == "output":
            if target != "output":
                raise ValueError(f"sparse_compile.load: {where} has a bad output target {target!r}")
        else:
            raise ValueError(f"sparse_compile.load: graph node #{i} has unknown op {op!r}")
        kwargs = n.get("kwargs", {"__dict__": {}})
        kw = kwargs.get("__dict__") if isinstance(kwargs, dict) else None
        if not isinstance(kw, dict) or not all(is_identifier_path(k) and "." not in k for k in kw):
            raise ValueError(f"sparse_compile.load: {where} has bad keyword arguments")
    return fns
