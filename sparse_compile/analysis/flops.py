"""Multiply-add counts of a (sparse) model, after Evci et al. (2021) and Appendix G of the paper.

Only Linear and Conv2d layers are counted (including the projections of ``nn.MultiheadAttention``,
which are linear layers that torch calls without going through their modules); biases,
activations, normalisation, pooling, additions and the attention score products are not. One
multiply-add counts 1 (Evci et al. and the RigL tables count 2 FLOPs per multiply-add: dense
ResNet-50 is 4.1e9 multiply-adds here, "8.2e9 FLOPs" there; ratios are the same).

For each layer, with ``P`` the output positions of one forward pass of ``input_shape`` (batch x
output pixels for a conv, batch x tokens for a linear; measured with forward hooks):

* ``dense``: ``out * fan_in_dense * P``, the layer without its mask;
* ``masked``: ``nnz * P``, the sparse layer as masked (the theoretical count of RigL / SRigL);
* ``condensed``: ``n_active * k * P``, the condensed form as executed (``k`` the maximum fan-in of
  the active neurons: the rows are padded to it when the fan-in is not constant);
* ``ablated_dense``: ``n_active * active_inputs * P``, the ablated-dense ("structured") form as
  executed: dense over the active neurons and over the inputs that survive upstream ablation.

``active_inputs`` is the dense fan-in restricted to the input channels / features whose producing
neuron is active, when that can be determined: the layer's input must come from one Linear/Conv2d
through ops that keep channels apart (BatchNorm, elementwise activations, dropout, pooling,
flatten), which is where ``sparse_compile.optimize`` removes the ablated inputs and folds their
constant contribution into the bias. Otherwise (residual additions, concatenations, attention,
grouped convolutions, a model FX cannot trace) it is the full input width. Each layer says which in
``inputs`` ("upstream" or "full").

Masks are read with :func:`sparse_compile.formats.get_mask` (the ``weight_mask`` buffers of our
trainer); a layer without a mask counts its non-zero weights as live.

:func:`training_flops` gives the cost of an SRigL / RigL run relative to dense training.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import analyze, get_mask
from ..fx import UNARY_ELEMENTWISE_FUNCTIONS, UNARY_ELEMENTWISE_METHODS, UNARY_ELEMENTWISE_MODULES

__all__ = ["FlopCount", "FlopReport", "flops", "TrainingFlops", "training_flops"]


@dataclass
class FlopCount:
    """Multiply-adds of one layer for one forward pass (see the module docstring)."""

    name: str
    kind: str  # "linear" or "conv2d"
    shape: tuple
    positions: int  # output positions P (summed over calls when a module runs more than once)
    fan_in_dense: int
    nnz: int
    n_active: int
    k: int  # maximum fan-in of the active neurons
    constant_fan_in: bool
    active_inputs: int
    inputs: str  # "upstream" (ablated inputs removed) or "full"
    dense: int
    masked: int
    condensed: int
    ablated_dense: int


class FlopReport(list):
    """A list of :class:`FlopCount` with totals; prints as a table, serialises with ``to_dict``."""

    def __init__(self, layers=(), input_shape=(), trace_error: str = ""):
        super().__init__(layers)
        self.input_shape = tuple(input_shape)
        self.trace_error = trace_error  # why active inputs could not be traced ("" when they could)

    def _sum(self, field: str) -> int:
        return sum(getattr(r, field) for r in self)

    @property
    def dense(self) -> int:
        """Total multiply-adds of the dense model."""
        return self._sum("dense")

    @property
    def masked(self) -> int:
        """Total multiply-adds of the sparse model as masked."""
        return self._sum("masked")

    @property
    def condensed(self) -> int:
        """Total multiply-adds with every layer in the condensed form."""
        return self._sum("condensed")

    @property
    def ablated_dense(self) -> int:
        """Total multiply-adds with every layer in the ablated-dense form."""
        return self._sum("ablated_dense")

    def to_dict(self) -> dict:
        """JSON-ready: the totals, ratios to dense, and one dict per layer."""
        d = max(self.dense, 1)
        return {
            "input_shape": list(self.input_shape),
            "unit": "multiply-adds",
            "trace_error": self.trace_error,
            "dense": self.dense, "masked": self.masked, "condensed": self.condensed,
            "ablated_dense": self.ablated_dense,
            "ratio": {f: getattr(self, f) / d for f in ("masked", "condensed", "ablated_dense")},
            "layers": [{**asdict(r), "shape": list(r.shape)} for r in self],
        }

    def to_json(self, **kw) -> str:
        """``to_dict`` as a JSON string."""
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        head = ("layer", "kind", "P", "k", "active", "inputs", "dense M", "masked M", "condensed M", "abl-dense M")
        rows = [
            (r.name, r.kind, str(r.positions), str(r.k) + ("" if r.constant_fan_in else "*"),
             f"{r.n_active}/{r.shape[0]}", f"{r.active_inputs}/{r.fan_in_dense} {r.inputs}",
             *(f"{getattr(r, f) / 1e6:.3f}" for f in ("dense", "masked", "condensed", "ablated_dense")))
            for r in self
        ]
        w = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w[i]) if i < 2 else h.rjust(w[i]) for i, h in enumerate(head))]
        lines.append("  ".join("-" * x for x in w))
        lines += ["  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
        d = max(self.dense, 1)
        lines.append(
            f"input {tuple(self.input_shape)}: dense {self.dense / 1e9:.4f} G multiply-adds; masked "
            f"{self.masked / d:.4f}x, condensed {self.condensed / d:.4f}x, ablated-dense {self.ablated_dense / d:.4f}x"
            + ("; * = fan-in not constant, condensed rows padded" if any(not r.constant_fan_in for r in self) else "")
        )
        if self.trace_error:
            lines.append(f"FX could not trace the model, so every layer counts its full input width ({self.trace_error})")
        return "\n".join(lines)

    __repr__ = __str__


# Ops through which a channel / feature keeps its identity, so an ablated producer neuron stays a
# removable (constant) input of the consumer. Anything else stops the search.
_PASS_MODULES = UNARY_ELEMENTWISE_MODULES + (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
)
_PASS_FUNCTIONS = UNARY_ELEMENTWISE_FUNCTIONS | {
    torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_PASS_METHODS = UNARY_ELEMENTWISE_METHODS | {"flatten"}


def _producers(model: nn.Module) -> tuple[dict, str]:
    """Map consumer module name -> producer module name (or None) from an FX trace of ``model``."""
    from ..fx import SPARSE_TYPES, sparse_module_nodes, trace

    try:
        gm = trace(model)
    except Exception as e:  # FX cannot trace every model; counts stay right, inputs become "full"
        return {}, f"{type(e).__name__}: {e}"
    out = {}
    for node in sparse_module_nodes(gm):
        src = node.args[0] if node.args else None
        found = None
        while isinstance(src, torch.fx.Node):
            if src.op == "call_module":
                m = gm.get_submodule(src.target)
                if isinstance(m, SPARSE_TYPES):
                    found = str(src.target)
                    break
                if not isinstance(m, _PASS_MODULES):
                    break
            elif src.op == "call_function" and src.target in _PASS_FUNCTIONS:
                pass
            elif src.op == "call_method" and src.target in _PASS_METHODS:
                pass
            else:
                break
            src = src.args[0] if src.args else None
        name = str(node.target)
        # A module called from several places keeps its ablated inputs only if every call agrees.
        out[name] = found if out.get(name, found) == found else None
    return out, ""


def _active_inputs(m: nn.Module, producer: Optional[nn.Module], fan_in_dense: int) -> tuple[int, str]:
    """Inputs of ``m`` left after removing the ablated outputs of ``producer`` (see module docstring)."""
    if producer is None:
        return fan_in_dense, "full"
    info = analyze(producer.weight, get_mask(producer))
    p_out = info.out_features
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.in_channels != p_out:
            return fan_in_dense, "full"
        return info.n_active * (fan_in_dense // m.in_channels), "upstream"
    if m.in_features % p_out:  # e.g. a flatten that does not keep whole channels together
        return fan_in_dense, "full"
    return info.n_active * (m.in_features // p_out), "upstream"


def _layer(name: str, kind: str, weight: torch.Tensor, mask, row_positions: torch.Tensor,
           active_inputs: int, inputs: str) -> FlopCount:
    """Counts for a weight whose row ``i`` runs at ``row_positions[i]`` output positions."""
    info = analyze(weight.detach(), mask, name)
    pos = row_positions.to(torch.int64)
    act = info.active_rows
    k = info.fan_in_max
    return FlopCount(
        name=name, kind=kind, shape=tuple(weight.shape), positions=int(pos.max()) if pos.numel() else 0,
        fan_in_dense=info.fan_in_dense, nnz=info.nnz, n_active=info.n_active, k=k,
        constant_fan_in=info.constant_fan_in, active_inputs=active_inputs, inputs=inputs,
        dense=int(pos.sum()) * info.fan_in_dense,
        masked=int((info.fan_in * pos).sum()),
        condensed=int(pos[act].sum()) * k,
        ablated_dense=int(pos[act].sum()) * active_inputs,
    )


def _is_attention(m: nn.Module) -> bool:
    """``nn.MultiheadAttention`` or a module with its interface that calls ``F.linear`` on raw
    projection weights (only the out-projection of such modules may be a called Linear)."""
    return isinstance(m, nn.MultiheadAttention) or (
        hasattr(m, "embed_dim") and any(isinstance(getattr(m, a, None), torch.Tensor)
                                        for a in ("in_proj_weight", "q_proj_weight"))
    )


@torch.no_grad()
def flops(model: nn.Module, input_shape: Sequence[int]) -> FlopReport:
    """Per-layer and total multiply-adds of one forward pass of an input of ``input_shape``
    (batch dimension included: ``(1, 3, 224, 224)`` gives per-image counts).

    The model runs once on zeros (in eval mode, restored afterwards, so BatchNorm statistics are not
    touched) to measure output sizes. See the module docstring for what each count means.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"flops: model must be an nn.Module, got {type(model).__name__}")
    try:
        input_shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"flops: input_shape must be a sequence of ints, got {input_shape!r}") from None
    if not input_shape or any(s <= 0 for s in input_shape):
        raise ValueError(f"flops: input_shape must be non-empty with positive sizes, got {input_shape}")
    p = next(iter(model.parameters()), None)
    x = torch.zeros(input_shape, dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32,
                    device=p.device if p is not None else "cpu")

    positions: dict[str, int] = {}
    attn_tokens: dict[str, tuple[int, int]] = {}  # name -> (query tokens, key/value tokens)
    handles = []

    def linear_hook(name):
        def hook(m, inp, out):
            positions[name] = positions.get(name, 0) + out.numel() // out.shape[-1 if isinstance(m, nn.Linear) else 1]
        return hook

    def conv_hook(name):
        def hook(m, inp, out):
            positions[name] = positions.get(name, 0) + out.numel() // m.out_channels
        return hook

    def attn_hook(name):
        def hook(m, args, kwargs, out):
            q = args[0] if args else kwargs["query"]
            kv = args[1] if len(args) > 1 else kwargs.get("key", q)
            lq, lk = attn_tokens.get(name, (0, 0))
            e_q = q.shape[-1]
            e_k = kv.shape[-1]
            attn_tokens[name] = (lq + q.numel() // e_q, lk + kv.numel() // e_k)
        return hook

    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook(name)))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif _is_attention(m):
            handles.append(m.register_forward_hook(attn_hook(name), with_kwargs=True))
    was_training = {n: mod.training for n, mod in modules.items()}
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        for n, mod in modules.items():
            mod.training = was_training[n]

    producers, why = _producers(model)
    report = FlopReport(input_shape=input_shape, trace_error=why)
    for name, m in modules.items():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            kind = "linear" if isinstance(m, nn.Linear) else "conv2d"
            pos = positions.get(name, 0)
            parent = name.rpartition(".")[0] if "." in name else ""
            if pos == 0 and name.endswith("out_proj") and parent in attn_tokens:
                pos = attn_tokens[parent][0]  # nn.MultiheadAttention reads out_proj.weight directly
            fan = analyze(m.weight.detach(), get_mask(m), name).fan_in_dense
            prod_name = producers.get(name)
            act, how = _active_inputs(m, modules.get(prod_name) if prod_name else None, fan)
            rows = torch.full((m.weight.shape[0],), pos, dtype=torch.int64)
            report.append(_layer(name, kind, m.weight, get_mask(m), rows, act, how))
        elif name in attn_tokens:
            lq, lk = attn_tokens[name]
            if isinstance(getattr(m, "in_proj_weight", None), torch.Tensor):
                w = m.in_proj_weight
                e = w.shape[0] // 3
                rows = torch.tensor([lq] * e + [lk] * (w.shape[0] - e), dtype=torch.int64)
                report.append(_layer(f"{name}.in_proj_weight" if name else "in_proj_weight", "linear", w,
                                     getattr(m, "in_proj_weight_mask", None), rows, w.shape[1], "full"))
            else:
                for pname, t in (("q_proj_weight", lq), ("k_proj_weight", lk), ("v_proj_weight", lk)):
                    w = getattr(m, pname, None)
                    if isinstance(w, torch.Tensor):
                        rows = torch.full((w.shape[0],), t, dtype=torch.int64)
                        report.append(_layer(f"{name}.{pname}" if name else pname, "linear", w,
                                             getattr(m, pname + "_mask", None), rows, w.shape[1], "full"))
    return report


@dataclass
class TrainingFlops:
    """Multiply-adds of a whole dynamic sparse training run against dense training (see
    :func:`training_flops`)."""

    total_steps: int
    delta_t: int
    grad_accumulation: int
    t_end: float
    n_updates: int
    sparse: float  # multiply-adds of the sparse run
    dense: float  # multiply-adds of dense training for the same steps

    @property
    def ratio(self) -> float:
        """Sparse run cost as a fraction of dense training."""
        return self.sparse / self.dense if self.dense else float("nan")

    def to_dict(self) -> dict:
        """JSON-ready fields, ratio included."""
        return {**asdict(self), "ratio": self.ratio}


def training_flops(
    sparse_forward: float,
    dense_forward: float,
    *,
    total_steps: int,
    delta_t: int = 100,
    grad_accumulation: int = 1,
    t_end: float = 0.75,
) -> TrainingFlops:
    """Training cost of an SRigL (or RigL) run, per Evci et al. (2020) and Appendix G.

    ``sparse_forward`` / ``dense_forward``: multiply-adds of one forward pass of a mini-batch, e.g.
    ``flops(model, shape).masked`` and ``.dense``. A training step is a forward pass plus a backward
    pass costing two forward passes (activation and weight gradients), so ``3 * sparse_forward``;
    dense training costs ``3 * dense_forward`` per step. The topology updates at steps
    ``delta_t, 2 delta_t, ...`` strictly before ``int(t_end * total_steps)`` (the trainer's
    schedule), and each update needs the
    dense weight gradient of the ``grad_accumulation`` mini-batches it averages: on those steps the
    weight gradient costs ``dense_forward`` instead of ``sparse_forward``. The mask update itself is
    ignored (amortised over ``delta_t`` steps, Appendix G).
    """
    for label, v in (("total_steps", total_steps), ("delta_t", delta_t), ("grad_accumulation", grad_accumulation)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"training_flops: {label} must be a positive integer, got {v!r}")
    if grad_accumulation > delta_t:
        raise ValueError(f"training_flops: grad_accumulation ({grad_accumulation}) cannot exceed delta_t ({delta_t})")
    if not 0.0 <= float(t_end) <= 1.0:
        raise ValueError(f"training_flops: t_end must be in [0, 1], got {t_end!r}")
    if not 0 <= sparse_forward <= dense_forward:
        raise ValueError(f"training_flops: need 0 <= sparse_forward ({sparse_forward}) <= dense_forward ({dense_forward})")
    # The trainer's schedule (SRigL.is_update_step): steps m * delta_t, m >= 1, strictly below
    # int(t_end * total_steps).
    t_end_step = int(float(t_end) * int(total_steps))
    n_updates = (t_end_step - 1) // int(delta_t) if t_end_step > 0 else 0
    sparse = 3.0 * sparse_forward * total_steps + n_updates * grad_accumulation * (dense_forward - sparse_forward)
    return TrainingFlops(int(total_steps), int(delta_t), int(grad_accumulation), float(t_end), n_updates,
                         sparse, 3.0 * dense_forward * total_steps)
