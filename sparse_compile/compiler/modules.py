"""The modules ``optimize`` puts in place of sparse Linear / Conv2d layers.

Every form computes only the layer's *active* output neurons (ablated neurons output a constant,
which :class:`ConstantScatter` puts back where the full width is needed):

* :class:`StructuredLinear` / :class:`StructuredConv2d` (form "ablated_dense"): plain dense layers over the
  active rows (and the kept input columns); subclasses of ``nn.Linear`` / ``nn.Conv2d``, so
  inductor and export treat them exactly like the originals.
* :class:`CondensedLinear` / :class:`CondensedConv2d` ("condensed"): ``torch.ops.sparse_compile``
  condensed ops over ``values [n, k]`` / ``indices [n, k]``.
* :class:`CSRLinear` / :class:`CSRConv2d` ("csr"): ``torch.sparse_csr`` weights.
* :class:`ConstantScatter`: places the active outputs into a constant-filled full-width output.
* :class:`ExplicitMultiheadAttention`: ``nn.MultiheadAttention`` with an ``out_proj`` that is
  actually called (the torch module reads ``out_proj.weight`` directly, so a condensed out-projection
  needs this).

All modules keep their state in parameters / buffers and plain attributes, which is what
:mod:`sparse_compile.compiler.serialize` stores.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels import validate as _validate
from ..kernels.checks import conv_out_hw, pair as _pair
from ..kernels.ops import csr_mm  # the op lives with the other op schemas

__all__ = [
    "StructuredLinear",
    "StructuredConv2d",
    "CondensedLinear",
    "CondensedConv2d",
    "CSRLinear",
    "CSRConv2d",
    "ConstantScatter",
    "ExplicitMultiheadAttention",
    "module_nbytes",
]


#: Activations a CondensedConv2d may apply to its output ("" = none).
CONV_ACTIVATIONS = ("", "relu")


def _param(t: Tensor, requires_grad: bool = False) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=requires_grad)


class StructuredLinear(nn.Linear):
    """A dense ``nn.Linear`` over a layer's active rows and kept input columns (ablated-dense form)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, requires_grad: bool = False):
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias=bias is not None, device="meta")
        self.weight = _param(weight, requires_grad)
        self.bias = None if bias is None else _param(bias, requires_grad)


class StructuredConv2d(nn.Conv2d):
    """A dense ``nn.Conv2d`` over a layer's active output channels and kept input channels."""

    def __init__(
        self,
        weight: Tensor,
        bias: Optional[Tensor],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        requires_grad: bool = False,
    ):
        out_c, in_per_group, kh, kw = weight.shape
        super().__init__(
            in_per_group * groups, out_c, (kh, kw), stride, padding, dilation, groups,
            bias=bias is not None, padding_mode=padding_mode, device="meta",
        )
        self.weight = _param(weight, requires_grad)
        self.bias = None if bias is None else _param(bias, requires_grad)


class _CondensedWeights(nn.Module):
    """Storage shared by the condensed layers: ``values`` (a parameter, trainable on request),
    ``indices`` (a buffer, so it moves with ``.to()`` and is saved) and an optional ``bias``."""

    def __init__(self, values: Tensor, indices: Tensor, bias: Optional[Tensor], requires_grad: bool):
        super().__init__()
        self.values = _param(values, requires_grad)
        self.register_buffer("indices", indices.detach().clone().contiguous())
        self.bias = None if bias is None else _param(bias, requires_grad)

    @property
    def k(self) -> int:
        """Fan-in of every active neuron / output channel."""
        return int(self.values.shape[1])


class CondensedLinear(_CondensedWeights):
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]`` for the ``n`` active neurons.

    ``values`` and ``bias`` are parameters (the op has gradients for both), ``indices`` a buffer.
    """

    def __init__(self, values: Tensor, indices: Tensor, bias: Optional[Tensor], in_features: int,
                 requires_grad: bool = False):
        super().__init__(values, indices, bias, requires_grad)
        self.in_features = int(in_features)
        self.out_features = int(values.shape[0])
        # Scans the indices once (and caches the result on them): forward then checks in O(1).
        if not (_validate.tracing() or self.indices.device.type == "meta"):
            _validate.check_fan_in(self.indices, self.in_features, "CondensedLinear", "in_features")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:  # the dense layer would raise too; never read past x
            raise ValueError(f"CondensedLinear: input has {x.shape[-1]} features, the layer expects "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        return kernels.condensed_linear(x, self.values, self.indices, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"index_dtype={self.indices.dtype}, bias={self.bias is not None}")


class CondensedConv2d(_CondensedWeights):
    """Conv2d (groups=1) over the ``n`` active output channels with a condensed weight.

    ``values`` / ``indices [n, k]`` index the fan-in ``in_channels*kh*kw`` in
    ``weight.reshape(out, -1)`` order. ``activation="relu"``: the output goes through ReLU
    (``optimize`` fuses a ReLU that follows the layer, see :mod:`.fuse`; on CPU the kernel applies it
    as it stores the outputs).
    """

    activation = ""  # a file saved before the attribute existed loads as "no activation"

    def __init__(self, values: Tensor, indices: Tensor, bias: Optional[Tensor], in_channels: int,
                 kernel_size, stride=1, padding=0, dilation=1, requires_grad: bool = False,
                 activation: str = ""):
        super().__init__(values, indices, bias, requires_grad)
        if activation not in CONV_ACTIVATIONS:
            raise ValueError(f"CondensedConv2d: activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.in_channels = int(in_channels)
        self.out_channels = int(values.shape[0])
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        kh, kw = self.kernel_size
        if not (_validate.tracing() or self.indices.device.type == "meta"):
            _validate.check_fan_in(self.indices, self.in_channels * kh * kw, "CondensedConv2d",
                                   "in_channels x kernel area")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"CondensedConv2d: expected input [N, {self.in_channels}, H, W], got shape "
                             f"{tuple(x.shape)}")
        return kernels.condensed_conv2d(x, self.values, self.indices, self.bias, self.kernel_size, self.stride,
                                        self.padding, self.dilation, relu=self.activation == "relu")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, k={self.k}"
                + (f", activation={self.activation}" if self.activation else ""))


def _tracing() -> bool:
    """True under torch.compile / export or a dispatch mode (e.g. fake tensors)."""
    if torch.compiler.is_compiling():
        return True
    stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return bool(stack and stack())


class _CSRBase(nn.Module):
    """Holds a CSR weight as its three arrays (plain buffers: serialisable, compile-friendly)."""

    def _set_csr(self, weight_csr: Tensor, bias: Optional[Tensor]) -> None:
        if weight_csr.layout != torch.sparse_csr:
            raise ValueError(f"{type(self).__name__}: weight must be sparse CSR, got layout {weight_csr.layout}")
        self.n_rows, self.n_cols = (int(s) for s in weight_csr.shape)
        self.register_buffer("crow_indices", weight_csr.crow_indices().detach().clone())
        self.register_buffer("col_indices", weight_csr.col_indices().detach().clone())
        self.register_buffer("values", weight_csr.values().detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())

    @property
    def nnz(self) -> int:
        """Stored entries of the weight."""
        return int(self.values.numel())

    def weight_csr(self) -> Tensor:
        """The weight as a ``torch.sparse_csr`` tensor."""
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, (self.n_rows, self.n_cols))

    def _mm(self, x2: Tensor) -> Tensor:
        if _tracing():  # compile / export / fake tensors: one opaque op over plain tensors
            return torch.ops.sparse_compile.csr_mm(self.crow_indices, self.col_indices, self.values, self.n_cols, x2)
        return csr_mm(self.crow_indices, self.col_indices, self.values, self.n_cols, x2)


class CSRLinear(_CSRBase):
    """A Linear whose ``[n, in]`` weight is CSR (``torch.sparse_csr`` matmul; not differentiable)."""

    def __init__(self, weight_csr: Tensor, bias: Optional[Tensor]):
        super().__init__()
        self._set_csr(weight_csr, bias)
        self.in_features, self.out_features = self.n_cols, self.n_rows

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        # CSR @ strided is the well-supported direction: y^T = W x^T.
        y = self._mm(x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}"


class CSRConv2d(_CSRBase):
    """Conv2d (groups=1) as unfold + CSR matmul over the ``[n, in*kh*kw]`` weight."""

    def __init__(self, weight_csr: Tensor, bias: Optional[Tensor], in_channels: int, kernel_size,
                 stride=1, padding=0, dilation=1):
        super().__init__()
        self._set_csr(weight_csr, bias)
        self.in_channels = int(in_channels)
        self.out_channels = self.n_rows
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        ho, wo = conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, F, L]
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [F, N*L]
        y = self._mm(cols).reshape(self.out_channels, n, ho * wo).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.reshape(n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, nnz={self.nnz}")


class ConstantScatter(nn.Module):
    """Put a reduced tensor's channels back at full width; missing channels hold a constant.

    ``x`` has ``index.numel()`` entries along ``dim``; the output has ``fill.numel()``, with
    ``out[..., index[j], ...] = x[..., j, ...]`` and ``out[..., c, ...] = fill[c]`` elsewhere. This is
    how an ablated neuron's constant output (its bias, then whatever elementwise ops follow) is
    restored where a consumer needs every channel (a residual add, a reshape into heads, the output).
    """

    def __init__(self, dim: int, index: Tensor, fill: Tensor):
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("index", index.detach().to(torch.int64).clone().contiguous())
        self.register_buffer("fill", fill.detach().clone().contiguous())

    @property
    def width(self) -> int:
        """Full width along ``dim``."""
        return int(self.fill.numel())

    def forward(self, x: Tensor) -> Tensor:
        dim = self.dim if self.dim >= 0 else x.dim() + self.dim
        shape = [1] * x.dim()
        shape[dim] = self.width
        full = list(x.shape)
        full[dim] = self.width
        base = self.fill.to(x.dtype).reshape(shape).expand(full)
        return base.index_copy(dim, self.index, x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, active={self.index.numel()}, width={self.width}"


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (eval semantics) whose ``out_proj`` is a module that is called.

    Same call signature and results as the torch module. Built by :meth:`from_module`, which keeps
    the original's projections; ``out_proj`` may then be replaced by any form module (and a
    :class:`ConstantScatter` when it has ablated rows).
    """

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool, dropout: float = 0.0):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.same_embed_dim = True
        self.in_proj_weight: Optional[nn.Parameter] = None
        self.in_proj_bias: Optional[nn.Parameter] = None
        self.q_proj_weight: Optional[nn.Parameter] = None
        self.k_proj_weight: Optional[nn.Parameter] = None
        self.v_proj_weight: Optional[nn.Parameter] = None
        self.out_proj: nn.Module = nn.Identity()

    @staticmethod
    def unsupported_reason(m: nn.MultiheadAttention) -> Optional[str]:
        """Why ``m`` cannot be made explicit (None when it can)."""
        if m.bias_k is not None or m.bias_v is not None:
            return "add_bias_kv=True is not supported"
        if m.add_zero_attn:
            return "add_zero_attn=True is not supported"
        return None

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention) -> "ExplicitMultiheadAttention":
        """Equivalent explicit module; raises ``ValueError`` for configurations it does not cover."""
        why = cls.unsupported_reason(m)
        if why:
            raise ValueError(f"ExplicitMultiheadAttention: {why}")
        e = cls(m.embed_dim, m.num_heads, m.batch_first, m.dropout)
        e.same_embed_dim = bool(m._qkv_same_embed_dim)
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            t = getattr(m, name, None)
            setattr(e, name, None if t is None else nn.Parameter(t.detach().clone(), t.requires_grad))
        op = m.out_proj
        lin = nn.Linear(op.in_features, op.out_features, bias=op.bias is not None,
                        device=op.weight.device, dtype=op.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(op.weight)
            if op.bias is not None:
                lin.bias.copy_(op.bias)
        mask = getattr(op, "weight_mask", None)
        if isinstance(mask, Tensor):
            lin.register_buffer("weight_mask", mask.detach().clone())
        e.out_proj = lin
        e.train(m.training)
        return e

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        E = self.embed_dim
        b = self.in_proj_bias
        bq = bk = bv = None
        if b is not None:
            bq, bk, bv = b[:E], b[E:2 * E], b[2 * E:]
        if self.same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        """Returns ``(output, weights or None)`` like ``nn.MultiheadAttention``."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, _ = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q = q.reshape(B, L, H, D).transpose(1, 2)
        k = k.reshape(B, S, H, D).transpose(1, 2)
        v = v.reshape(B, S, H, D).transpose(1, 2)
        mask = self._merged_mask(attn_mask, key_padding_mask, B, L, S, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            w = torch.softmax(scores, dim=-1)
            if dropout_p:
                w = F.dropout(w, dropout_p)
            out = torch.matmul(w, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=bool(is_causal and mask is None)
            )
            w = None
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if w is not None:
            if average_attn_weights:
                w = w.mean(dim=1)
            if not batched:
                w = w.squeeze(0)
        return out, w

    def _merged_mask(self, attn_mask, key_padding_mask, B, L, S, dtype) -> Optional[Tensor]:
        """One additive float mask broadcastable to ``[B, H, L, S]`` (bool True = not allowed)."""
        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # [B*H, L, S]
                mask = mask.reshape(B, self.num_heads, L, S)
        if key_padding_mask is not None:
            kp = additive(key_padding_mask).reshape(B, 1, 1, S)
            mask = kp if mask is None else mask + kp
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def module_nbytes(m: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
