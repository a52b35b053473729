"""``save`` / ``load`` of optimized models: safetensors tensors plus a JSON rebuild spec, no pickled code.

The file is a single ``.safetensors`` file. Its tensors are every parameter, buffer and tensor
attribute of the model; its metadata entry ``"sparse_compile"`` is a JSON spec that says how to
rebuild the model from code that is already installed:

* the module tree: for each module its class (by qualified name), its plain attributes (numbers,
  strings, tuples, dtypes...), which parameters / buffers it has, and its children;
* for an ``fx.GraphModule``: the graph as a list of nodes (op, target, args, kwargs), with functions
  named by module and name;
* the optimize report and config, and the example input shapes.

Loading runs nothing the file chose. Every function, tensor method and module class the spec
names must be on the exact allow-lists of :mod:`sparse_compile.compiler.load_policy` (extend with
``trusted=`` for your own packages), and every name fx writes into the generated ``forward`` must
be a plain identifier; all of this is checked before the graph is built, so before any of it runs.
No pickled code is read. Then every condensed layer goes through
:meth:`sparse_compile.formats.Condensed.from_tensors`, scatter / CSR indices and every layer's shapes
are checked, direct calls of ``torch.ops.sparse_compile`` ops get the same index checks, and the
graph is run once on fake tensors of the recorded input shapes. A corrupted or tampered file raises
``ValueError`` naming the layer and the fault. A SHA-256 of the tensor bytes, written by ``save``,
detects accidental corruption; it is not an authentication (whoever edits the file can recompute it).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import __version__
from .load_checks import dry_run, get_attr, is_sc_op, validate_module, validate_op_node
from .load_policy import check_graph_spec, is_identifier_path, resolve_class

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "sparse_compile.model"
FORMAT_VERSION = 1
META_KEY = "sparse_compile"

_MODULE_INTERNALS = set(vars(nn.Module())) - {"training"}
# Plain-data attributes must not shadow methods or module machinery (``forward = "..."``).
_RESERVED_ATTRS = {"forward", "dump_patches", "call_super_init"}
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


def _class_name(m: nn.Module) -> str:
    cls = type(m)
    return f"{cls.__module__}.{cls.__qualname__}"


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
    # Detects accidental corruption of tensor bytes; not an authentication (anyone can recompute it).
    spec["tensor_sha256"] = tensor_checksum(tensors.data)
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
    cls = resolve_class(spec["class"], trusted, f"module {where!r}")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for part in ("attrs", "tensor_attrs", "params", "buffers", "children"):
        if not isinstance(spec.get(part, {}), dict):
            raise ValueError(f"sparse_compile.load: bad {part} of module {where!r}")
        for k in spec.get(part, {}):
            if not is_identifier_path(k, digits=True) or "." in k:
                raise ValueError(f"sparse_compile.load: bad {part[:-1]} name {k!r} in module {where!r}")
    for k, v in spec.get("attrs", {}).items():
        if k in _MODULE_INTERNALS or k in _RESERVED_ATTRS or callable(getattr(cls, k, None)):
            raise ValueError(f"sparse_compile.load: attribute {k!r} of {where!r} is not allowed")
        m.__dict__[k] = _dec(v, where=f"attribute {k!r} of {where!r}")
    for k, key in spec.get("tensor_attrs", {}).items():
        m.__dict__[k] = _tensor(tensors, key, f"{where}.{k}")
    for k, p in spec.get("params", {}).items():
        if p is None:
            m._parameters[k] = None
        else:
            if not isinstance(p, dict):
                raise ValueError(f"sparse_compile.load: bad parameter {k!r} of {where!r}")
            t = _tensor(tensors, p.get("key"), f"{where}.{k}")
            m._parameters[k] = nn.Parameter(t, requires_grad=bool(p.get("requires_grad")) and t.is_floating_point())
    for k, key in spec.get("buffers", {}).items():
        m._buffers[k] = None if key is None else _tensor(tensors, key, f"{where}.{k}")
    m._non_persistent_buffers_set = set(spec.get("non_persistent", []))
    for k, c in spec.get("children", {}).items():
        m._modules[k] = None if c is None else _build_module(c, f"{path}.{k}" if path else k, tensors, trusted)
    return m


def _build_graph(nodes: list, fns: dict) -> fx.Graph:
    """The fx graph of an already checked node list (``fns``: node name -> resolved function)."""
    g = fx.Graph()
    env: dict = {}
    for n in nodes:
        where = f"node {n['name']!r}"
        target = fns[n["name"]] if n["op"] == "call_function" else n["target"]
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


def load(path: Union[str, Path], device=None, trusted: Iterable[str] = (), check: bool = True) -> nn.Module:
    """Rebuild a model written by :func:`save` (in eval mode unless it was saved in training mode).

    Nothing the file names runs unless it is on the allow-lists of :mod:`sparse_compile.compiler.load_policy`
    (exact functions, tensor methods, module classes of torch.nn, torchvision, timm and
    sparse_compile); everything is checked before the graph is built or run. ``trusted`` adds
    packages whose functions and module classes you trust (your own model code). ``check=False``
    skips the fake-tensor shape check (the per-layer index / shape validation always runs). A bad
    file raises ``ValueError`` with the reason; a missing one ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sparse_compile.load: no such file: {path}")
    if not path.is_file():
        raise ValueError(f"sparse_compile.load: {path} is not a file")
    trusted = tuple(trusted)
    if not all(isinstance(t, str) and is_identifier_path(t) for t in trusted):
        raise ValueError(f"sparse_compile.load: trusted must be package names, got {trusted!r}")
    try:
        return _load(path, device, trusted, check)
    except ValueError:
        raise
    except (RecursionError, MemoryError) as e:
        raise ValueError(f"sparse_compile.load: the rebuild spec in {path} is too deeply nested or too large "
                         f"({type(e).__name__})") from None
    except Exception as e:  # any other fault of a malformed spec: say so, as the documented ValueError
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"sparse_compile.load: malformed file {path} ({type(e).__name__}: {msg})") from None


def tensor_checksum(tensors: dict) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path):
    from safetensors import safe_open

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
    want = spec.get("tensor_sha256")
    if want is not None and tensor_checksum(tensors) != want:
        raise ValueError(f"sparse_compile.load: the tensors in {path} do not match the file's checksum "
                         "(the file was corrupted or edited after it was saved)")
    return spec, tensors


def _load(path: Path, device, trusted: tuple, check: bool) -> nn.Module:
    spec, tensors = _read(path)
    is_gm = bool(spec.get("graph_module"))
    # 1. Every name in the graph against the allow-lists, before anything is built.
    fns = check_graph_spec(spec.get("graph") or [], trusted) if is_gm else {}
    # 2. The module tree (classes from the allow-list, plain-data attributes; no code runs).
    root = _build_module(spec.get("root"), "", tensors, trusted)
    for name, m in root.named_modules():
        validate_module(name or "<root>", m)
    if is_gm:
        graph = _build_graph(spec["graph"], fns)
        for n in graph.nodes:
            if n.op in ("call_module", "get_attr"):
                try:
                    obj = root.get_submodule(n.target) if n.op == "call_module" else get_attr(root, n.target)
                except (AttributeError, ValueError) as e:
                    raise ValueError(f"sparse_compile.load: node {n.name!r} refers to missing {n.target!r} ({e})") from None
                if n.op == "get_attr" and not isinstance(obj, (Tensor, nn.Module)):
                    raise ValueError(f"sparse_compile.load: node {n.name!r} reads {n.target!r}, which is not a tensor")
            elif n.op == "call_function" and is_sc_op(n.target):
                validate_op_node(n, root)
        class_name = spec.get("class_name") or "GraphModule"
        if not is_identifier_path(class_name) or "." in class_name:
            raise ValueError(f"sparse_compile.load: bad class name {class_name!r}")
        # 3. Only now does fx generate (and exec) the forward source: every name in it was checked.
        model = fx.GraphModule(root, graph, class_name)
    else:
        model = root
    model.train(bool(spec.get("training", False)))
    if spec.get("report") is not None:
        from .report import OptimizeReport

        model.sparse_compile_report = OptimizeReport.from_dict(spec["report"])
    if spec.get("config") is not None:
        model.sparse_compile_config = spec["config"]
    if check and spec.get("inputs"):
        dry_run(model, spec["inputs"])
    if spec.get("inputs"):
        model.sparse_compile_input_spec = spec["inputs"]
    if device is not None:
        model.to(device)
    return model
