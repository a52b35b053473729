"""Sparse weight formats: analysis and exact conversions of Linear / Conv2d weights.

Every other part of sparse_compile reads a sparse weight through this module.

A weight is a Linear ``[out, in]`` or Conv2d ``[out, in/groups, kh, kw]`` tensor. Its *fan-in
dimension* is ``in/groups*kh*kw``: a conv weight is viewed as the matrix ``[out, in/groups*kh*kw]``
(``weight.reshape(out, -1)``), which is also the column order of ``F.unfold``. Each row is a
*neuron* (output feature or output channel).

Which entries are live is decided by an optional boolean ``mask`` of the weight's shape. A mask
wins over zero-testing, because trained SRigL weights can be exactly 0.0 at live positions; without
a mask, non-zero entries are live. A neuron whose row has no live entry is *ablated*.

Forms (each converts back to the masked dense weight exactly):

* :class:`Condensed`: ``values [n_active, k]`` and ``indices [n_active, k]`` (sorted per row, int16
  when the fan-in dimension fits, else int32) over the active rows ``active_rows [n_active]``.
* :class:`AblatedDense`: the dense weight restricted to the active rows.
* :class:`CSRForm`: a ``torch.sparse_csr_tensor`` of the active rows (or of all rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Optional

import torch

from .kernels.checks import INDEX_DTYPES, VALUE_DTYPES  # the dtypes the kernels take

__all__ = [
    "WeightAnalysis",
    "Condensed",
    "AblatedDense",
    "CSRForm",
    "live_mask",
    "analyze",
    "to_condensed",
    "to_ablated_dense",
    "to_csr",
    "index_dtype_for",
    "get_mask",
    "VALUE_DTYPES",
    "INDEX_DTYPES",
]


def _check_weight(weight: torch.Tensor, name: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"layer {name!r}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 3, 4, 5):
        raise ValueError(
            f"layer {name!r}: expected a Linear [out, in] or Conv [out, in/groups, *kernel] weight, "
            f"got shape {tuple(weight.shape)}"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The [out, fan-in] matrix view of a weight (explicit sizes: -1 is ambiguous when out == 0)."""
    fan = 1
    for s in t.shape[1:]:
        fan *= int(s)
    return t.reshape(t.shape[0], fan)


def get_mask(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """The boolean live-weight mask a module carries, or None.

    SRigL (this package's trainer) and ``torch.nn.utils.prune`` both keep the mask as a buffer named
    ``weight_mask`` of the weight's shape.
    """
    m = getattr(module, "weight_mask", None)
    if isinstance(m, torch.Tensor):
        return m.bool()
    return None


def live_mask(weight: torch.Tensor, mask: Optional[torch.Tensor] = None, name: str = "weight") -> torch.Tensor:
    """Boolean tensor of the weight's shape: True where the weight is live.

    ``mask`` (any dtype, non-zero means live) wins over testing the weight for zeros.
    """
    _check_weight(weight, name)
    if mask is None:
        return weight != 0
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"layer {name!r}: mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    return mask.to(device=weight.device).bool()


@dataclass
class WeightAnalysis:
    """Sparsity structure of one sparse weight: fan-in per neuron, active rows (see :func:`analyze`)."""

    name: str
    shape: tuple
    fan_in_dense: int  # in/groups * prod(kernel)
    fan_in: torch.Tensor  # [out] live weights per neuron (int64)
    active_rows: torch.Tensor  # [n_active] int64, sorted
    nnz: int

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def n_active(self) -> int:
        return int(self.active_rows.numel())

    @property
    def n_ablated(self) -> int:
        return self.out_features - self.n_active

    @property
    def numel(self) -> int:
        return self.out_features * self.fan_in_dense

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    @property
    def active_fan_in(self) -> torch.Tensor:
        return self.fan_in[self.active_rows]

    @property
    def fan_in_min(self) -> int:
        """Smallest fan-in over active neurons (0 when every neuron is ablated)."""
        a = self.active_fan_in
        return int(a.min()) if a.numel() else 0

    @property
    def fan_in_max(self) -> int:
        a = self.active_fan_in
        return int(a.max()) if a.numel() else 0

    @property
    def constant_fan_in(self) -> bool:
        """True when every active neuron has the same fan-in (vacuously true with none active)."""
        return self.fan_in_min == self.fan_in_max

    @property
    def k(self) -> Optional[int]:
        """The constant fan-in, or None when the fan-in varies."""
        return self.fan_in_max if self.constant_fan_in else None


def __getattr__(name: str):
    # LayerAnalysis was its name in 0.1.0; `formats` is a public module, so outside code may import it.
    if name == "LayerAnalysis":
        warnings.warn("sparse_compile.formats.LayerAnalysis is renamed WeightAnalysis; the old name will be "
                      "removed in a later release", DeprecationWarning, stacklevel=2)
        return WeightAnalysis
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def analyze(weight: torch.Tensor, mask: Optional[torch.Tensor] = None, name: str = "weight") -> WeightAnalysis:
    """Per-neuron fan-in, active / ablated neurons and sparsity of a Linear or Conv weight."""
    live = _rows(live_mask(weight, mask, name))
    fan_in = live.sum(dim=1).to(torch.int64).cpu()
    active = torch.nonzero(fan_in > 0).flatten()
    return WeightAnalysis(
        name=name,
        shape=tuple(weight.shape),
        fan_in_dense=int(live.shape[1]),
        fan_in=fan_in,
        active_rows=active,
        nnz=int(fan_in.sum()),
    )


def index_dtype_for(fan_in_dense: int) -> torch.dtype:
    """int16 when every index of a fan-in dimension of this size fits, else int32."""
    return torch.int16 if fan_in_dense - 1 <= torch.iinfo(torch.int16).max else torch.int32


def _check_bias(bias: Optional[torch.Tensor], out: int, name: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"layer {name!r}: bias must have shape ({out},), got {shape}")


@dataclass
class Condensed:
    """Constant fan-in (ELL-like) form of a weight: only the active rows, only their live entries.

    Row ``r`` of ``values``/``indices`` is neuron ``active_rows[r]``; ``indices`` are positions in the
    fan-in dimension (``in/groups*kh*kw`` for a conv). No dense copy is kept. Build one with
    :func:`to_condensed`, or from stored tensors with :meth:`from_tensors`, which validates.
    """

    values: torch.Tensor  # [n_active, k]
    indices: torch.Tensor  # [n_active, k] int16 / int32, sorted per row, unique per row
    active_rows: torch.Tensor  # [n_active] int64, sorted, unique
    weight_shape: tuple
    bias: Optional[torch.Tensor] = None  # [out] (full width: ablated neurons still output bias)
    name: str = "weight"
    padded: bool = False  # rows were padded to a common k with value-0 entries

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def fan_in_dense(self) -> int:
        n = 1
        for s in self.weight_shape[1:]:
            n *= int(s)
        return n

    @property
    def n_active(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of values, indices, active rows and bias."""
        t = [self.values, self.indices, self.active_rows] + ([self.bias] if self.bias is not None else [])
        return sum(x.numel() * x.element_size() for x in t)

    def validate(self) -> "Condensed":
        """Check shapes, dtypes and ranges; raise ``ValueError`` naming the layer and the fault."""
        n, name = self.name, self.name
        v, i, a = self.values, self.indices, self.active_rows
        for label, t in (("values", v), ("indices", i), ("active_rows", a)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"layer {n!r}: {label} must be a tensor, got {type(t).__name__}")
        if len(self.weight_shape) < 2 or any(int(s) < 0 for s in self.weight_shape):
            raise ValueError(f"layer {n!r}: invalid weight shape {tuple(self.weight_shape)}")
        if v.dtype not in VALUE_DTYPES:
            raise ValueError(f"layer {n!r}: values dtype {v.dtype} not allowed (allowed: {VALUE_DTYPES})")
        if i.dtype not in INDEX_DTYPES:
            raise ValueError(f"layer {n!r}: indices dtype {i.dtype} not allowed (allowed: int16, int32)")
        if a.dtype != torch.int64:
            raise ValueError(f"layer {n!r}: active_rows dtype must be int64, got {a.dtype}")
        if v.dim() != 2 or i.dim() != 2 or tuple(v.shape) != tuple(i.shape):
            raise ValueError(
                f"layer {n!r}: values {tuple(v.shape)} and indices {tuple(i.shape)} must both be [n_active, k]"
            )
        if a.dim() != 1 or a.numel() != v.shape[0]:
            raise ValueError(
                f"layer {n!r}: active_rows has shape {tuple(a.shape)}, expected ({v.shape[0]},) to match values"
            )
        out, fan = self.out_features, self.fan_in_dense
        if v.shape[1] > fan:
            raise ValueError(f"layer {n!r}: k={v.shape[1]} exceeds the fan-in dimension {fan}")
        if i.dtype == torch.int16 and fan - 1 > torch.iinfo(torch.int16).max:
            raise ValueError(f"layer {n!r}: int16 indices cannot address a fan-in dimension of {fan}")
        if a.numel():
            if int(a.min()) < 0 or int(a.max()) >= out:
                raise ValueError(
                    f"layer {n!r}: active_rows out of range [0, {out}): min {int(a.min())}, max {int(a.max())}"
                )
            if a.numel() > 1 and not bool((a[1:] > a[:-1]).all()):
                raise ValueError(f"layer {n!r}: active_rows must be strictly increasing (sorted, unique)")
        if i.numel():
            lo, hi = int(i.min()), int(i.max())
            if lo < 0 or hi >= fan:
                raise ValueError(f"layer {n!r}: index out of range [0, {fan}): min {lo}, max {hi}")
            if i.shape[1] > 1:
                s = i.to(torch.int64).sort(dim=1).values
                dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
                if bool(dup.any()):
                    row = int(torch.nonzero(dup).flatten()[0])
                    raise ValueError(f"layer {n!r}: duplicate index in condensed row {row} (neuron {int(a[row])})")
        _check_bias(self.bias, out, name)
        return self

    @classmethod
    def from_tensors(
        cls,
        values: torch.Tensor,
        indices: torch.Tensor,
        active_rows: torch.Tensor,
        weight_shape,
        bias: Optional[torch.Tensor] = None,
        name: str = "weight",
        padded: bool = False,
    ) -> "Condensed":
        """Build from stored tensors (e.g. a loaded file) and validate before anything reads them."""
        c = cls(values, indices, active_rows, tuple(int(s) for s in weight_shape), bias, name, padded)
        return c.validate()

    def to_dense(self) -> torch.Tensor:
        """The dense (masked) weight this form represents, of shape ``weight_shape``."""
        out = torch.zeros(self.out_features, self.fan_in_dense, dtype=self.values.dtype, device=self.values.device)
        if self.n_active and self.k:
            rows = torch.zeros(self.n_active, self.fan_in_dense, dtype=self.values.dtype, device=self.values.device)
            rows.scatter_(1, self.indices.to(torch.int64), self.values)
            out[self.active_rows] = rows
        return out.reshape(self.weight_shape)

    def to_mask(self) -> torch.Tensor:
        """Boolean live mask of ``weight_shape`` (padding entries are not live)."""
        m = torch.zeros(self.out_features, self.fan_in_dense, dtype=torch.bool, device=self.values.device)
        if self.n_active and self.k:
            live = torch.ones_like(self.values, dtype=torch.bool)
            if self.padded:
                live = self.values != 0
            rows = torch.zeros(self.n_active, self.fan_in_dense, dtype=torch.bool, device=self.values.device)
            rows.scatter_(1, self.indices.to(torch.int64), live)
            m[self.active_rows] = rows
        return m.reshape(self.weight_shape)


def to_condensed(
    weight: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    name: str = "weight",
    pad: bool = False,
    index_dtype: Optional[torch.dtype] = None,
) -> Condensed:
    """Convert a constant fan-in weight to :class:`Condensed`.

    Raises ``ValueError`` naming the layer and its fan-in range when the active neurons' fan-in is
    not constant, unless ``pad=True``: then every row is padded to the maximum fan-in with value-0
    entries. Pad entries point at the lowest columns the row does not use (rather than all at
    column 0), so every row stays sorted and duplicate-free and kernels need no special case; the
    result is still exact.
    """
    info = analyze(weight, mask, name)
    _check_bias(bias, info.out_features, name)
    if not info.constant_fan_in and not pad:
        raise ValueError(
            f"layer {name!r}: fan-in is not constant over active neurons (min {info.fan_in_min}, "
            f"max {info.fan_in_max}); the condensed form needs constant fan-in. Pass pad=True to pad "
            f"rows to the maximum fan-in, or use the CSR form."
        )
    if index_dtype is None:
        index_dtype = index_dtype_for(info.fan_in_dense)
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"layer {name!r}: index_dtype must be torch.int16 or torch.int32, got {index_dtype}")
    if index_dtype == torch.int16 and info.fan_in_dense - 1 > torch.iinfo(torch.int16).max:
        raise ValueError(f"layer {name!r}: int16 indices cannot address a fan-in dimension of {info.fan_in_dense}")
    live = _rows(live_mask(weight, mask, name))
    w2 = _rows(weight.detach())
    act = info.active_rows.to(weight.device)
    live_a = live[act]
    k = info.fan_in_max
    # Live entries first (in column order), then unused columns (in column order): a stable sort on
    # "not live" gives exactly that, so the first k columns are the live ones plus the pads.
    order = torch.sort((~live_a).to(torch.int8), dim=1, stable=True).indices[:, :k]
    idx = torch.sort(order, dim=1).values
    vals = torch.gather(w2[act], 1, idx) * torch.gather(live_a, 1, idx).to(w2.dtype)
    c = Condensed(
        values=vals.contiguous(),
        indices=idx.to(index_dtype).contiguous(),
        active_rows=info.active_rows.to(device=weight.device, dtype=torch.int64),
        weight_shape=tuple(weight.shape),
        bias=None if bias is None else bias.detach(),
        name=name,
        padded=not info.constant_fan_in,
    )
    return c


@dataclass
class AblatedDense:
    """The dense weight restricted to active rows (ablated neurons dropped)."""

    weight: torch.Tensor  # [n_active, *weight_shape[1:]]
    active_rows: torch.Tensor  # [n_active] int64
    weight_shape: tuple
    bias: Optional[torch.Tensor] = None  # [out], full width
    name: str = "weight"

    @property
    def n_active(self) -> int:
        return int(self.active_rows.numel())

    def to_dense(self) -> torch.Tensor:
        """The full dense weight, zero rows for ablated neurons."""
        out = torch.zeros(self.weight_shape, dtype=self.weight.dtype, device=self.weight.device)
        out[self.active_rows] = self.weight
        return out


def to_ablated_dense(
    weight: torch.Tensor, mask: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, name: str = "weight"
) -> AblatedDense:
    """Drop ablated rows; masked entries of the kept rows are zeroed."""
    info = analyze(weight, mask, name)
    _check_bias(bias, info.out_features, name)
    live = live_mask(weight, mask, name)
    act = info.active_rows.to(weight.device)
    w = (weight.detach() * live.to(weight.dtype))[act].contiguous()
    return AblatedDense(w, act.to(torch.int64), tuple(weight.shape), None if bias is None else bias.detach(), name)


@dataclass
class CSRForm:
    """A ``torch.sparse_csr_tensor`` of the 2-D weight view, of the active rows or of all rows."""

    csr: torch.Tensor  # [n_rows, fan_in_dense]
    active_rows: Optional[torch.Tensor]  # None when csr holds all rows
    weight_shape: tuple
    name: str = "weight"

    def to_dense(self) -> torch.Tensor:
        """The full dense weight."""
        d = self.csr.to_dense()
        if self.active_rows is None:
            return d.reshape(self.weight_shape)
        out = torch.zeros(self.weight_shape[0], d.shape[1], dtype=d.dtype, device=d.device)
        out[self.active_rows] = d
        return out.reshape(self.weight_shape)


def to_csr(
    weight: torch.Tensor, mask: Optional[torch.Tensor] = None, active_only: bool = True, name: str = "weight"
) -> CSRForm:
    """CSR of the live entries (live zeros under a mask are stored explicitly, so the pattern is kept)."""
    info = analyze(weight, mask, name)
    live = _rows(live_mask(weight, mask, name))
    w2 = _rows(weight.detach())
    rows = info.active_rows.to(weight.device) if active_only else None
    if rows is not None:
        live, w2 = live[rows], w2[rows]
    counts = live.sum(dim=1)
    crow = torch.zeros(live.shape[0] + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    r, c = torch.nonzero(live, as_tuple=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = torch.sparse_csr_tensor(
            crow, c, w2[r, c], size=tuple(live.shape), dtype=weight.dtype, device=weight.device,
            check_invariants=False,  # built from a nonzero() scan, valid by construction
        )
    return CSRForm(csr, rows, tuple(weight.shape), name)
