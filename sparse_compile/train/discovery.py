"""Which weights of a model the sparse trainer manages, found by FX tracing.

A *target* is one weight parameter: the ``weight`` of a Linear or Conv2d (the ViT patch projection
is a Conv2d; ``nn.MultiheadAttention.out_proj`` is a Linear inside an FX leaf module, found by
looking inside leaves), or, only when asked, the raw ``in_proj_weight`` of ``nn.MultiheadAttention``.
Norms, embeddings and biases are never targets.

Tracing gives the execution order (for "keep the first layer dense") and the layers that feed the
graph output (the heads, which are never ablated). A model FX cannot trace falls back to
``named_modules()`` with a warning saying what that loses.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from torch import nn

from ..fx import SPARSE_TYPES, output_feeding_modules, trace

__all__ = ["Target", "Discovery", "discover", "unwrap", "QKV_NAMES"]

# Last name component of the attention input projections kept dense by ``dense_qkv=True``
# (timm ``attn.qkv``, HF ``q_proj``/``query``..., lucidrains ``to_qkv``...), compared lower-case.
QKV_NAMES = frozenset({
    "qkv", "q", "k", "v", "kv", "q_proj", "k_proj", "v_proj", "qkv_proj", "in_proj", "query", "key",
    "value", "to_qkv", "to_q", "to_k", "to_v", "to_kv", "wqkv", "q_lin", "k_lin", "v_lin",
})
_MHA_RAW = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass
class Target:
    """One weight parameter managed by the trainer."""

    module_name: str  # as in model.named_modules() of the model given to the trainer
    param_name: str  # "weight", or e.g. "in_proj_weight"
    module: nn.Module
    head: bool = False  # feeds the output: never ablated
    dense: bool = False  # kept dense by option, but counted in the parameter budget

    @property
    def name(self) -> str:
        """Layer name: the module name, plus the parameter name when it is not ``weight``."""
        if self.param_name == "weight":
            return self.module_name
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def param_key(self) -> str:
        """The parameter's name in ``model.named_parameters()``."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def param(self) -> nn.Parameter:
        """The parameter itself, looked up now (survives ``model.to(...)``)."""
        return getattr(self.module, self.param_name)


@dataclass
class Discovery:
    """Result of :func:`discover`."""

    targets: list  # [Target], in execution order when traced
    skipped: dict = field(default_factory=dict)  # layer name -> why it stays dense and outside the budget
    traced: bool = True


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers, and the
    name prefix its parameters carry in the wrapper (``"module."``, ``"_orig_mod."``)."""
    prefix = ""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model, prefix = model.module, prefix + "module."
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else (a or b)


def _candidates_traced(inner: nn.Module, leaf_modules, dense_qkv: bool):
    """(module_name, param_name) in execution order, and the head module names."""
    gm = trace(inner, leaf_modules)
    found: list[tuple[str, str]] = []

    def add_inside(prefix: str, mod: nn.Module):
        for sub_name, sub in mod.named_modules():
            full = _join(prefix, sub_name)
            if isinstance(sub, SPARSE_TYPES):
                found.append((full, "weight"))
            elif isinstance(sub, nn.MultiheadAttention) and not dense_qkv:
                for p in _MHA_RAW:
                    if getattr(sub, p, None) is not None:
                        found.append((full, p))

    for node in gm.graph.nodes:
        if node.op == "call_module":
            add_inside(str(node.target), inner.get_submodule(str(node.target)))
        elif node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            try:
                mod = inner.get_submodule(owner)
            except AttributeError:
                continue
            if isinstance(mod, SPARSE_TYPES) and attr == "weight":
                found.append((owner, "weight"))
    return found, output_feeding_modules(gm)


def _candidates_untraced(inner: nn.Module, dense_qkv: bool):
    found = []
    for name, mod in inner.named_modules():
        if isinstance(mod, SPARSE_TYPES):
            found.append((name, "weight"))
        elif isinstance(mod, nn.MultiheadAttention) and not dense_qkv:
            found.extend((name, p) for p in _MHA_RAW if getattr(mod, p, None) is not None)
    return found


def discover(
    model: nn.Module,
    *,
    dense_first: bool = False,
    dense_qkv: bool = True,
    exclude: Union[str, Iterable[str]] = (),
    head: Optional[Union[str, Iterable[str]]] = None,
    leaf_modules: Iterable[type] = (),
) -> Discovery:
    """Find the weights to sparsify.

    * ``dense_first``: keep the first layer (in execution order) dense; it still counts in the budget.
    * ``dense_qkv``: keep attention q/k/v input projections dense and outside the budget (the paper's
      ViT setting): Linear layers named as in :data:`QKV_NAMES`; ``nn.MultiheadAttention``'s raw
      ``in_proj_weight`` is sparsified only when this is False.
    * ``exclude``: ``fnmatch`` patterns on layer names (or parameter names); matches stay dense and
      outside the budget. A pattern matching nothing is an error (it is almost always a typo).
    * ``head``: names of the output layer(s), never ablated. By default the layers feeding the traced
      graph's output; without a graph, the last registered layer (with a warning).
    """
    inner, prefix = unwrap(model)
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    if isinstance(head, str):
        head = (head,)
    traced = True
    try:
        found, heads = _candidates_traced(inner, tuple(leaf_modules), dense_qkv)
    except Exception as e:  # FX raises many types (TraceError, TypeError, AttributeError...)
        traced = False
        found, heads = _candidates_untraced(inner, dense_qkv), set()
        if head is not None:
            guess = f"using head={sorted(head)!r} as given"
        elif found:
            heads = {found[-1][0]}
            guess = f"guessing the last registered layer {found[-1][0]!r}; pass head=[...] to name them"
        else:
            guess = "none found"
        msg = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(
            f"torch.fx could not trace {type(inner).__name__} ({type(e).__name__}: {msg}); sparse layers were "
            f"found with named_modules() instead. Lost without the graph: detection of the output layer(s) that "
            f"must never be ablated ({guess}), the execution order (dense_first keeps the first *registered* "
            f"layer dense), and layers that forward() never uses are sparsified too.",
            stacklevel=3,
        )

    # Every name a parameter has (a weight tied to an embedding, or a module registered twice).
    names_of: dict[int, list] = {}
    for pname, prm in inner.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(prm), []).append(pname)
    seen, targets, skipped = set(), [], {}
    for mod_name, p_name in found:
        module = inner.get_submodule(mod_name)
        prm = getattr(module, p_name)
        if id(prm) in seen:
            continue
        seen.add(id(prm))
        t = Target(_join(prefix.rstrip("."), mod_name), p_name, module)
        others = [n for n in names_of.get(id(prm), [])
                  if inner.get_submodule(n.rpartition(".")[0]) is not module]
        if others:
            # A mask on a tied weight would also sparsify the other user (e.g. an embedding).
            skipped[t.name] = f"weight shared with {others[0]!r}"
            continue
        targets.append(t)
    if not targets:
        raise ValueError(f"{type(inner).__name__}: no Linear or Conv2d layer found to sparsify")

    if dense_first:
        targets[0].dense = True
    used_patterns = set()
    kept = []
    for t in targets:
        hit = [p for p in exclude if fnmatch.fnmatchcase(t.name, p) or fnmatch.fnmatchcase(t.param_key, p)]
        if hit:
            used_patterns.update(hit)
            skipped[t.name] = f"excluded by pattern {hit[0]!r}"
        elif dense_qkv and t.param_name == "weight" and t.module_name.rpartition(".")[2].lower() in QKV_NAMES \
                and isinstance(t.module, nn.Linear):
            skipped[t.name] = "attention q/k/v input projection (dense_qkv=True)"
        else:
            kept.append(t)
    unused = [p for p in exclude if p not in used_patterns]
    if unused:
        names = ", ".join(t.name for t in targets[:8]) + (", ..." if len(targets) > 8 else "")
        raise ValueError(f"exclude pattern(s) {unused} match no layer; layers are: {names}")
    for name, mod in inner.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and dense_qkv:
            skipped[_join(_join(prefix.rstrip("."), name), "in_proj_weight")] = (
                "attention q/k/v input projection (dense_qkv=True)")

    if head is not None:
        names = {t.name for t in kept} | {t.module_name for t in kept}
        bad = [h for h in head if _join(prefix.rstrip("."), h) not in names and h not in names]
        if bad:
            raise ValueError(
                f"head {bad} is not a sparse layer of {type(inner).__name__}; sparse layers: "
                + ", ".join(t.name for t in kept[-5:]) + (" (last 5)" if len(kept) > 5 else "")
            )
        head_set = {h for h in head} | {_join(prefix.rstrip("."), h) for h in head}
        for t in kept:
            t.head = t.name in head_set or t.module_name in head_set
    else:
        full_heads = {_join(prefix.rstrip("."), h) for h in heads}
        for t in kept:
            t.head = t.module_name in full_heads
    if not kept:
        raise ValueError(f"{type(inner).__name__}: every Linear/Conv2d layer was excluded; nothing to sparsify")
    return Discovery(kept, skipped, traced)
