"""``torch.compile(model, backend="sparse_compile", options={...})``: the optimize pass as a Dynamo backend.

Registered under the ``torch_dynamo_backends`` entry point (see ``pyproject.toml``), so torch finds
it by name after ``pip install`` without importing sparse_compile first.

Dynamo hands a backend the graph it captured, with ``nn.Module`` calls inlined: a Linear is
``torch._C._nn.linear(x, weight, bias)`` with the parameters as graph inputs. The backend turns
those calls (and ``conv2d`` / eval ``batch_norm``) back into modules holding the parameters, runs
:func:`sparse_compile.optimize` on that graph with the example inputs Dynamo gives, and hands the
result to inductor (``torch.compile`` passes ``mode=`` as a keyword and ``options=`` as a dict).

Options (all optional):

* ``"mode"``: the optimize mode ("auto" by default, or "dense", "ablated_dense", "condensed", "csr",
  or a dict of layer-name pattern -> mode; names are the model's own, e.g. ``"layer1.0.conv1"``);
* ``"model"``: the original ``nn.Module``, to read its ``weight_mask`` buffers (Dynamo's graph
  sees only the weights, so without it the sparsity structure is read from zeros: exact, but a
  live weight that is exactly 0.0 makes the fan-in look non-constant; padding covers that);
* ``"inductor"``: False returns the optimized graph run eagerly instead of compiling it;
* ``"max_autotune"``: True compiles with inductor's "max-autotune" mode (as does passing
  ``mode="max-autotune"`` to ``torch.compile``); ``"inductor_options"``: extra inductor config;
* ``"reports"``: a list; the :class:`~sparse_compile.compiler.report.OptimizeReport` of each graph
  the backend optimizes is appended to it (Dynamo compiles one graph per graph break, so a model
  may give several);
* any :class:`sparse_compile.OptimizeConfig` field (e.g. ``"repeats"``, ``"auto_forms"``).

Example::

    reports = []
    c = torch.compile(model, backend="sparse_compile", options={"model": model, "reports": reports})
    c(x)                 # compiles on the first call
    print(reports[-1])   # what optimize did with the (last) captured graph

The optimized graph holds its own (rewritten) copies of the weights: changing the model's
parameters after compiling does not reach it. Compile again after training.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["sparse_compile_backend", "modularize"]

_LINEAR = {torch._C._nn.linear, F.linear}
_CONV2D = {torch.conv2d, F.conv2d}
_BATCH_NORM = {F.batch_norm}


def _source_path(node: fx.Node) -> Optional[str]:
    """``"layer1.0.conv1.weight"`` from Dynamo's source of a lifted parameter, if it can tell."""
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    try:
        name = src.name() if callable(getattr(src, "name", None)) else getattr(src, "name", None)
    except Exception:  # source objects differ across torch versions; naming is best effort
        name = None
    if not isinstance(name, str):
        return None
    mods = re.findall(r"_modules\['([^']+)'\]", name)
    leaf = re.findall(r"_(?:parameters|buffers)\['([^']+)'\]", name)
    if not leaf:
        return None
    return ".".join(mods + leaf[-1:])


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _unique_target(gm: fx.GraphModule, want: Optional[str], fallback: str) -> str:
    cand = want or fallback
    base, k = cand, 1
    while True:
        try:
            gm.get_submodule(cand)
        except AttributeError:
            return cand
        cand = f"{base}_{k}"
        k += 1


def modularize(gm: fx.GraphModule, example_inputs, model: Optional[nn.Module] = None) -> fx.GraphModule:
    """Turn Dynamo's functional ``linear`` / ``conv2d`` / eval ``batch_norm`` calls into modules.

    A call is converted when its weight (and bias, running statistics) are graph inputs or
    attributes with real tensors. Modules are named after the parameter's source in the model
    (``layer1.0.conv1``), and get the model's ``weight_mask`` buffer when ``model`` is given.
    Returns a new GraphModule (``gm`` is left as it is); its node metadata (fake tensors) is dropped
    so it can be deep-copied.
    """
    # Work on a copy: Dynamo reads the metadata of its own graph after the backend returns.
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    gm = fx.GraphModule(gm, graph, type(gm).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {n: v for n, v in zip(placeholders, example_inputs)}
    ranks = {}  # node -> rank of its tensor output (from Dynamo's fake values; replaced nodes inherit it)
    for n in gm.graph.nodes:
        ev = n.meta.get("example_value")
        if isinstance(ev, torch.Tensor):
            ranks[n] = ev.dim()

    def real(n):
        if not isinstance(n, fx.Node):
            return n if n is None else False
        if n.op == "placeholder":
            v = values.get(n)
        elif n.op == "get_attr":
            v = getattr(gm, n.target, None) if "." not in n.target else None
        else:
            return False
        if isinstance(v, torch.Tensor) and not isinstance(v, torch._subclasses.FakeTensor):
            return v
        return False

    def mask_for(path: Optional[str]):
        if model is None or not path:
            return None
        mod_path = path.rpartition(".")[0]
        try:
            m = model.get_submodule(mod_path) if mod_path else model
        except AttributeError:
            return None
        mk = getattr(m, "weight_mask", None)
        return mk.detach() if isinstance(mk, torch.Tensor) else None

    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        module = None
        x = node.args[0] if node.args else None
        if node.target in _LINEAR:
            w, b = real(_arg(node, 1, "weight")), real(_arg(node, 2, "bias"))
            if w is False or b is False or w is None or w.dim() != 2:
                continue
            module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
            module.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
            if b is not None:
                module.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        elif node.target in _CONV2D:
            w, b = real(_arg(node, 1, "weight")), real(_arg(node, 2, "bias"))
            if w is False or b is False or w is None or w.dim() != 4:
                continue
            stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
            dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
            if any(isinstance(a, fx.Node) for a in (stride, padding, dilation, groups)):
                continue
            module = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding, dilation, groups,
                               bias=b is not None, device="meta")
            module.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
            if b is not None:
                module.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        elif node.target in _BATCH_NORM:
            rm, rv = real(_arg(node, 1, "running_mean")), real(_arg(node, 2, "running_var"))
            w, b = real(_arg(node, 3, "weight")), real(_arg(node, 4, "bias"))
            training = _arg(node, 5, "training", False)
            eps = _arg(node, 7, "eps", 1e-5)
            rank = ranks.get(x)
            if (training is not False or any(v is False or v is None for v in (rm, rv)) or w is False or b is False
                    or rank is None or isinstance(eps, fx.Node)):
                continue
            cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
            if cls is None:
                continue
            module = cls(rm.shape[0], eps=eps, affine=w is not None, device="meta")
            if w is not None:
                module.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
                module.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
            module.running_mean, module.running_var = rm, rv
            module.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=rm.device)
            module.eval()
        if module is None:
            continue
        wnode = _arg(node, 1, "weight") if node.target not in _BATCH_NORM else _arg(node, 3, "weight") or _arg(node, 1, "running_mean")
        path = _source_path(wnode) if isinstance(wnode, fx.Node) else None
        if node.target is not None and node.target not in _BATCH_NORM:
            mk = mask_for(path)
            if mk is not None and tuple(mk.shape) == tuple(module.weight.shape):
                module.register_buffer("weight_mask", mk.to(module.weight.device).bool())
        target = _unique_target(gm, path.rpartition(".")[0] if path else None, f"sc_{node.name}")
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (x,))
        if node in ranks:
            ranks[new] = ranks[node]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    for n in gm.graph.nodes:
        n.meta = {}
    gm.graph.lint()
    gm.recompile()
    return gm


def sparse_compile_backend(gm: fx.GraphModule, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None,
                           **unused):
    """Dynamo backend: optimize the captured graph, then compile it with inductor.

    ``torch.compile`` calls it as ``backend(gm, example_inputs, mode=..., options=...)`` (each only when
    given). See the module docstring for the options.
    """
    from .api import OptimizeConfig, optimize

    opts = dict(options or {})
    opt_mode = opts.pop("mode", "auto")
    model = opts.pop("model", None)
    use_inductor = bool(opts.pop("inductor", True))
    max_autotune = bool(opts.pop("max_autotune", False))
    inductor_options = dict(opts.pop("inductor_options", {}) or {})
    reports = opts.pop("reports", None)
    if reports is not None and not hasattr(reports, "append"):
        raise TypeError(f"sparse_compile backend: option 'reports' must be a list to append to, "
                        f"got {type(reports).__name__}")
    if unused:
        warnings.warn(f"sparse_compile backend: ignoring unexpected arguments {sorted(unused)}")
    cfg_fields = set(OptimizeConfig.__dataclass_fields__)
    bad = set(opts) - cfg_fields
    if bad:
        raise ValueError(f"sparse_compile backend: unknown option(s) {sorted(bad)}; known: mode, model, inductor, "
                         f"max_autotune, inductor_options, reports and the OptimizeConfig fields {sorted(cfg_fields)}")
    opts.setdefault("pad_condensed", model is None)
    cfg = OptimizeConfig(mode=opt_mode, **opts)
    inputs = list(example_inputs)
    gm = modularize(gm, inputs, model)
    with warnings.catch_warnings():
        # Inside a compile, "not converted" notes go to the report (opt.sparse_compile_report), not stderr.
        warnings.simplefilter("ignore", UserWarning)
        opt = optimize(gm, example_inputs=inputs, config=cfg)
    if reports is not None:
        reports.append(opt.sparse_compile_report)
    if not use_inductor:
        return opt.forward
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    inductor_mode = mode or ("max-autotune" if max_autotune else None)
    if inductor_mode and inductor_mode != "default":
        patches.update(torch._inductor.list_mode_options(inductor_mode))
    patches.update(inductor_options)
    return compile_fx(opt, inputs, config_patches=patches or None)
