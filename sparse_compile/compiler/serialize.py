"""``save`` / ``load`` of optimized models: safetensors tensors plus a JSON rebuild spec, no pickled code.

The file is a single ``.safetensors`` file. Its tensors are every parameter, buffer and tensor
attribute of the model; its metadata entry ``"sparse_compile"`` is a JSON spec that says how to
rebuild the model from code that is already installed:

* the module tree: for each module its class (by qualified name), its plain attributes (numbers,
  strings, tuples, dtypes...), which parameters / buffers it has, and its children;
* for an ``fx.GraphModule``: the graph as a list of nodes (op, target, args, kwargs), with functions
  named by module and name;
* the optimize report and config, and the example input shapes.

Loading only resolves classes and functions from an allow-list of packages (``torch.nn``, ``torch``
functions, ``operator``, ``math``, ``torchvision``, ``timm``, ``sparse_compile``; extend with
``trusted=``), never runs pickled code, and validates before anything runs: every condensed layer
goes through :meth:`sparse_compile.formats.Condensed.from_tensors`, scatter / CSR indices and every
layer's shapes are checked, and the graph is run once on fake tensors of the recorded input
shapes. A corrupted or tampered file raises ``ValueError`` naming the layer and the fault.
"""
from __future__ import annotations

import builtins
import importlib
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import __version__
from ..formats import Condensed
from .modules import (
    CondensedConv2d,
    CondensedLinear,
    ConstantScatter,
    CSRConv2d,
    CSRLinear,
    ExplicitMultiheadAttention,
)

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "sparse_compile.model"
FORMAT_VERSION = 1
META_KEY = "sparse_compile"

_ALLOWED_CLASS_PREFIXES = ("torch.nn.", "torchvision.", "timm.", "sparse_compile.")
_ALLOWED_FN_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch.functional", "torch.fx",
                       "_operator", "operator", "math", "torchvision", "timm", "sparse_compile")
_SAFE_BUILTINS = {"getattr", "len", "int", "float", "bool", "slice", "range", "tuple", "list", "max", "min",
                  "abs", "round", "sum", "all", "any"}
_DENIED_NAMES = {"load", "save", "exec", "eval", "compile", "open", "system", "popen", "__import__",
                 "import_module", "hub", "setattr", "delattr", "globals", "locals", "vars", "from_file"}
_MODULE_INTERNALS = set(vars(nn.Module())) - {"training"}
# Attributes optimize() attaches to its result; stored in the spec's own fields.
_OWN_ATTRS = {"sparse_compile_report", "sparse_compile_config", "sparse_compile_input_spec"}


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
def _enc(v, where: str):
    """JSON encoding of an attribute / argument value (Nodes are encoded by the caller's hook)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return {"__float__": repr(v)}
    if isinstance(v, torch.Size):
        return {"__size__": [int(x) for x in v]}
    if isinstance(v, tuple):
        return {"__tuple__": [_enc(x, where) for x in v]}
    if isinstance(v, list):
        return [_enc(x, where) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"__dict__": {k: _enc(x, where) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"__slice__": [_enc(v.start, where), _enc(v.stop, where), _enc(v.step, where)]}
    if v is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"__device__": str(v)}
    if isinstance(v, torch.memory_format):
        return {"__memory_format__": str(v).replace("torch.", "")}
    if isinstance(v, torch.layout):
        return {"__layout__": str(v).replace("torch.", "")}
    if isinstance(v, fx.Node):
        return {"__node__": v.name}
    raise ValueError(f"sparse_compile.save: cannot store {where} of type {type(v).__name__} ({v!r:.80}) without code")


def _dec(v, nodes: Optional[dict] = None, where: str = "value"):
    if isinstance(v, list):
        return [_dec(x, nodes, where) for x in v]
    if not isinstance(v, dict):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise ValueError(f"sparse_compile.load: bad encoded {where}: {v!r:.80}")
    if len(v) != 1:
        raise ValueError(f"sparse_compile.load: bad encoded {where}: {v!r:.80}")
    (tag, x), = v.items()
    if tag == "__float__":
        if x not in ("inf", "-inf", "nan"):
            raise ValueError(f"sparse_compile.load: bad float {x!r} in {where}")
        return float(x)
    if tag == "__size__":
        return torch.Size([int(e) for e in x])
    if tag == "__tuple__":
        return tuple(_dec(e, nodes, where) for e in x)
    if tag == "__dict__":
        return {str(k): _dec(e, nodes, where) for k, e in x.items()}
    if tag == "__slice__":
        return slice(*(_dec(e, nodes, where) for e in x))
    if tag == "__ellipsis__":
        return Ellipsis
    if tag in ("__dtype__", "__memory_format__", "__layout__"):
        t = getattr(torch, str(x), None)
        kinds = {"__dtype__": torch.dtype, "__memory_format__": torch.memory_format, "__layout__": torch.layout}
        if not isinstance(t, kinds[tag]):
            raise ValueError(f"sparse_compile.load: unknown {tag.strip('_')} {x!r} in {where}")
        return t
    if tag == "__device__":
        return torch.device(str(x))
    if tag == "__node__":
        if nodes is None or x not in nodes:
            raise ValueError(f"sparse_compile.load: {where} refers to unknown node {x!r}")
        return nodes[x]
    raise ValueError(f"sparse_compile.load: unknown tag {tag!r} in {where}")


# ---------------------------------------------------------------------------------------------
# Functions and classes by name
# ---------------------------------------------------------------------------------------------
def _fn_name(fn) -> str:
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops:{fn}"
    name = getattr(fn, "__name__", None)
    candidates = [getattr(fn, "__module__", None), "torch", "torch.nn.functional", "_operator", "math", "builtins"]
    for mod in candidates:
        if not mod or not name:
            continue
        try:
            if getattr(importlib.import_module(mod), name, None) is fn:
                return f"{mod}:{name}"
        except ImportError:
            continue
    raise ValueError(f"sparse_compile.save: cannot name function {fn!r} for the rebuild spec")


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


def _allowed_module(mod: str, prefixes: Iterable[str]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _resolve_fn(ref: str, trusted: tuple):
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"sparse_compile.load: bad function reference {ref!r}")
    mod, name = ref.split(":", 1)
    mod = _moved(mod)
    if mod == "torch.ops":
        ns, _, rest = name.partition(".")
        parts = rest.split(".")
        if ns not in ("aten", "sparse_compile") or not 1 <= len(parts) <= 2:
            raise ValueError(f"sparse_compile.load: operator {name!r} is not allowed")
        obj = getattr(torch.ops, ns)
        for p in parts:
            obj = getattr(obj, p)
        return obj
    if name in _DENIED_NAMES or (name.startswith("_") and name != "_assert"):
        raise ValueError(f"sparse_compile.load: function {ref!r} is not allowed")
    if mod == "builtins":
        if name not in _SAFE_BUILTINS:
            raise ValueError(f"sparse_compile.load: builtin {name!r} is not allowed")
        return getattr(builtins, name)
    if not _allowed_module(mod, _ALLOWED_FN_MODULES + trusted):
        raise ValueError(f"sparse_compile.load: functions from {mod!r} are not allowed (trusted= extends the list)")
    try:
        obj = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"sparse_compile.load: cannot resolve function {ref!r} ({e})") from None
    if not callable(obj) or isinstance(obj, type) and issubclass(obj, BaseException):
        raise ValueError(f"sparse_compile.load: {ref!r} is not a function")
    return obj


def _class_name(m: nn.Module) -> str:
    cls = type(m)
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_class(name: str, trusted: tuple):
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"sparse_compile.load: bad class name {name!r}")
    if name == "torch.nn.modules.module.Module":
        return nn.Module
    name = _moved(name)
    if not any(name.startswith(p) for p in _ALLOWED_CLASS_PREFIXES + tuple(t + "." for t in trusted)):
        raise ValueError(f"sparse_compile.load: class {name!r} is not allowed (trusted= extends the list)")
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
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return obj
        break
    raise ValueError(f"sparse_compile.load: cannot resolve module class {name!r}")


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
class _Tensors:
    def __init__(self):
        self.data: dict = {}
        self._ids: dict = {}

    def add(self, key: str, t: Tensor) -> str:
        if t.layout != torch.strided:
            raise ValueError(f"sparse_compile.save: tensor {key!r} has layout {t.layout}; only strided tensors are stored")
        if id(t) in self._ids:
            return self._ids[id(t)]
        self._ids[id(t)] = key
        self.data[key] = t.detach().to("cpu").contiguous()
        return key


def _module_spec(m: nn.Module, path: str, tensors: _Tensors, is_root_gm: bool = False) -> dict:
    where = path or "<root>"
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        if getattr(m, hooks, None):
            raise ValueError(f"sparse_compile.save: module {where!r} has {hooks[1:]}, which cannot be stored without code")
    spec: dict = {"class": "torch.nn.modules.module.Module" if is_root_gm else _class_name(m)}
    attrs, tensor_attrs = {}, {}
    is_gm = isinstance(m, fx.GraphModule)
    for k, v in vars(m).items():
        if k in _MODULE_INTERNALS or k in _OWN_ATTRS:
            continue
        key = f"{path}.{k}" if path else k
        if isinstance(v, Tensor):
            tensor_attrs[k] = tensors.add(key, v)
            continue
        if is_gm:  # the graph, code and tracer state are rebuilt from the node list
            continue
        attrs[k] = _enc(v, f"attribute {k!r} of module {where!r} ({type(m).__name__})")
    spec["attrs"] = attrs
    spec["tensor_attrs"] = tensor_attrs
    params = {}
    for k, p in m._parameters.items():
        key = f"{path}.{k}" if path else k
        params[k] = None if p is None else {"key": tensors.add(key, p), "requires_grad": bool(p.requires_grad)}
    spec["params"] = params
    buffers = {}
    for k, b in m._buffers.items():
        key = f"{path}.{k}" if path else k
        buffers[k] = None if b is None else tensors.add(key, b)
    spec["buffers"] = buffers
    spec["non_persistent"] = sorted(m._non_persistent_buffers_set)
    spec["children"] = {
        k: (None if c is None else _module_spec(c, f"{path}.{k}" if path else k, tensors))
        for k, c in m._modules.items()
    }
    return spec


def _graph_spec(gm: fx.GraphModule) -> list:
    out = []
    for n in gm.graph.nodes:
        where = f"argument of node {n.name!r}"
        if n.op == "call_function":
            target = _fn_name(n.target)
        elif isinstance(n.target, str):
            target = n.target
        else:
            raise ValueError(f"sparse_compile.save: node {n.name!r} has a non-string target {n.target!r}")
        out.append({
            "op": n.op, "name": n.name, "target": target,
            "args": _enc(tuple(n.args), where), "kwargs": _enc(dict(n.kwargs), where),
        })
    return out


def save(model: nn.Module, path: Union[str, Path], example_inputs=None) -> Path:
    """Write ``model`` (usually from :func:`sparse_compile.optimize`) to a ``.safetensors`` file.

    ``example_inputs`` (default: the shapes ``optimize`` recorded) are stored as shapes and dtypes
    only, for the shape check at load time. Raises ``ValueError`` when part of the model cannot be
    described without code (a hook, an attribute holding an object). Classes from outside the
    allowed packages are written but refused at load time unless ``trusted=`` names them.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"sparse_compile.save: expected an nn.Module, got {type(model).__name__}")
    tensors = _Tensors()
    is_gm = isinstance(model, fx.GraphModule)
    spec = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sparse_compile": __version__,
        "torch": torch.__version__,
        "graph_module": is_gm,
        "class_name": type(model).__name__ if is_gm else None,
        "root": _module_spec(model, "", tensors, is_root_gm=is_gm),
        "graph": _graph_spec(model) if is_gm else None,
        "training": bool(model.training),
    }
    rep = getattr(model, "sparse_compile_report", None)
    spec["report"] = rep.to_dict() if rep is not None and hasattr(rep, "to_dict") else None
    spec["config"] = getattr(model, "sparse_compile_config", None)
    spec["inputs"] = getattr(model, "sparse_compile_input_spec", None)
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None:
        spec["inputs"] = [
            {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} if isinstance(x, Tensor)
            else {"value": _enc(x, "example input")}
            for x in example_inputs
        ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors.data, str(path), metadata={META_KEY: json.dumps(spec)})
    return path


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def _tensor(tensors: dict, key, where: str) -> Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise ValueError(f"sparse_compile.load: tensor {key!r} for {where} is missing from the file")
    return tensors[key]


def _build_module(spec: dict, path: str, tensors: dict, trusted: tuple) -> nn.Module:
    where = path or "<root>"
    if not isinstance(spec, dict) or "class" not in spec:
        raise ValueError(f"sparse_compile.load: bad module spec at {where!r}")
    cls = _resolve_class(spec["class"], trusted)
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in spec.get("attrs", {}).items():
        if k in _MODULE_INTERNALS or k.startswith("__"):
            raise ValueError(f"sparse_compile.load: attribute {k!r} of {where!r} is not allowed")
        m.__dict__[k] = _dec(v, where=f"attribute {k!r} of {where!r}")
    for k, key in spec.get("tensor_attrs", {}).items():
        m.__dict__[k] = _tensor(tensors, key, f"{where}.{k}")
    for k, p in spec.get("params", {}).items():
        if p is None:
            m._parameters[k] = None
        else:
            t = _tensor(tensors, p.get("key"), f"{where}.{k}")
            m._parameters[k] = nn.Parameter(t, requires_grad=bool(p.get("requires_grad")) and t.is_floating_point())
    for k, key in spec.get("buffers", {}).items():
        m._buffers[k] = None if key is None else _tensor(tensors, key, f"{where}.{k}")
    m._non_persistent_buffers_set = set(spec.get("non_persistent", []))
    for k, c in spec.get("children", {}).items():
        m._modules[k] = None if c is None else _build_module(c, f"{path}.{k}" if path else k, tensors, trusted)
    return m


def _build_graph(nodes: list, trusted: tuple) -> fx.Graph:
    g = fx.Graph()
    env: dict = {}
    ops = {"placeholder", "get_attr", "call_function", "call_method", "call_module", "output"}
    for i, n in enumerate(nodes):
        if not isinstance(n, dict) or n.get("op") not in ops or not isinstance(n.get("name"), str):
            raise ValueError(f"sparse_compile.load: bad graph node #{i}")
        where = f"node {n['name']!r}"
        target = n.get("target")
        if n["op"] == "call_function":
            target = _resolve_fn(target, trusted)
        elif not isinstance(target, str):
            raise ValueError(f"sparse_compile.load: {where} has a bad target")
        if n["op"] == "call_method" and (target.startswith("_") or not hasattr(torch.Tensor, target)):
            raise ValueError(f"sparse_compile.load: {where} calls unknown tensor method {target!r}")
        args = _dec(n.get("args", {"__tuple__": []}), env, f"arguments of {where}")
        kwargs = _dec(n.get("kwargs", {"__dict__": {}}), env, f"arguments of {where}")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError(f"sparse_compile.load: {where} has bad arguments")
        node = g.create_node(n["op"], target, args, kwargs, name=n["name"])
        if node.name != n["name"]:
            raise ValueError(f"sparse_compile.load: duplicate node name {n['name']!r}")
        env[n["name"]] = node
    g.lint()
    return g


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"sparse_compile.load: layer {where!r}: {msg}")


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _validate_module(name: str, m: nn.Module) -> None:
    """Structural checks of one module's tensors against its attributes (raise ValueError)."""
    if isinstance(m, (CondensedLinear, CondensedConv2d)):
        n = m.values.shape[0] if m.values.dim() >= 1 else -1
        if isinstance(m, CondensedLinear):
            shape = (n, int(m.in_features))
        else:
            shape = (n, int(m.in_channels), *m.kernel_size)
        _check(m.values.dim() == 2, name, f"values must be 2-D, got shape {_shape(m.values)}")
        _check(int(m.out_features if isinstance(m, CondensedLinear) else m.out_channels) == n, name,
               f"{n} condensed rows but the layer declares {m.out_features if isinstance(m, CondensedLinear) else m.out_channels}")
        Condensed.from_tensors(m.values.detach(), m.indices, torch.arange(n, dtype=torch.int64), shape,
                               None if m.bias is None else m.bias.detach(), name=name)
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


def _dry_run(gm: nn.Module, inputs: list) -> None:
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
                    args.append(_dec(i.get("value")))
            with torch.no_grad():
                gm(*args)
        del mode
    except ValueError as e:
        raise ValueError(f"sparse_compile.load: the model fails on its recorded input shapes: {e}") from None
    except Exception as e:  # a shape mismatch inside a layer: say where, never crash later in a kernel
        raise ValueError(
            f"sparse_compile.load: the model fails on its recorded input shapes ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load(path: Union[str, Path], device=None, trusted: Iterable[str] = (), check: bool = True) -> nn.Module:
    """Rebuild a model written by :func:`save` (in eval mode unless it was saved in training mode).

    ``trusted`` adds package prefixes whose module classes and functions may be used (by default
    only torch, torchvision, timm, operator, math and sparse_compile). ``check=False`` skips the
    fake-tensor shape check (the per-layer index / shape validation always runs).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sparse_compile.load: no such file: {path}")
    trusted = tuple(trusted)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            # clone(): fresh, aligned storage. Tensors sliced from the file buffer can sit at any
            # offset, and BLAS picks different (differently rounded) kernels for unaligned data.
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header / body
        raise ValueError(f"sparse_compile.load: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    raw = meta.get(META_KEY)
    if raw is None:
        raise ValueError(f"sparse_compile.load: {path} has no sparse_compile rebuild spec (not written by sparse_compile.save)")
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"sparse_compile.load: the rebuild spec in {path} is not valid JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"sparse_compile.load: {path} is not a {FORMAT} file")
    if spec.get("version") != FORMAT_VERSION:
        raise ValueError(f"sparse_compile.load: file format version {spec.get('version')!r} is not supported "
                         f"(this sparse_compile reads version {FORMAT_VERSION})")
    root = _build_module(spec.get("root"), "", tensors, trusted)
    if spec.get("graph_module"):
        graph = _build_graph(spec.get("graph") or [], trusted)
        for n in graph.nodes:
            if n.op in ("call_module", "get_attr"):
                try:
                    root.get_submodule(n.target) if n.op == "call_module" else _get_attr(root, n.target)
                except (AttributeError, ValueError) as e:
                    raise ValueError(f"sparse_compile.load: node {n.name!r} refers to missing {n.target!r} ({e})") from None
        model = fx.GraphModule(root, graph, str(spec.get("class_name") or "GraphModule"))
    else:
        model = root
    for name, m in model.named_modules():
        _validate_module(name or "<root>", m)
    model.train(bool(spec.get("training", False)))
    if spec.get("report") is not None:
        from .report import OptimizeReport

        model.sparse_compile_report = OptimizeReport.from_dict(spec["report"])
    if spec.get("config") is not None:
        model.sparse_compile_config = spec["config"]
    if check and spec.get("inputs"):
        _dry_run(model, spec["inputs"])
    if spec.get("inputs"):
        model.sparse_compile_input_spec = spec["inputs"]
    if device is not None:
        model.to(device)
    return model


def _get_attr(root: nn.Module, target: str):
    obj = root
    for p in target.split("."):
        if not hasattr(obj, p):
            raise AttributeError(f"no attribute {p!r}")
        obj = getattr(obj, p)
    return obj
