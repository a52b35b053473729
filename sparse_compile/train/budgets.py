"""Layer-wise sparsity distributions, integer fan-in budgets and sparse initialisation.

These are pure functions of weight shapes, shared by the trainer (``sparse_compile.train.trainer``) and
by anything that needs the budgets without training (FLOP tables, theory).

A weight of shape ``[out, in/groups, *kernel]`` has ``out`` neurons and a dense fan-in of
``in/groups * prod(kernel)`` (its ``reshape(out, -1)`` view). Under constant fan-in each neuron keeps
the same integer number ``k`` of weights, so a layer's budget is ``out * k`` and the achieved global
sparsity differs from the requested one by that rounding; :func:`achieved_sparsity` gives it exactly.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import torch

__all__ = [
    "DISTRIBUTIONS",
    "fan_in_dense",
    "layer_densities",
    "constant_fan_in",
    "layer_fan_ins",
    "layer_budgets",
    "achieved_sparsity",
    "random_constant_fan_in_mask",
    "random_mask",
    "sparse_init_",
]

DISTRIBUTIONS = ("erk", "uniform")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_shape(name: str, shape) -> tuple:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"layer {name!r}: shape must be a sequence of ints, got {shape!r}") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(f"layer {name!r}: expected a weight shape [out, fan-in dims...] of positive sizes, got {shape}")
    return shape


def fan_in_dense(shape: Sequence[int]) -> int:
    """Dense fan-in of a weight: the product of every dimension but the first."""
    return _numel(tuple(shape)[1:])


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    dense: Iterable[str] = (),
) -> dict[str, float]:
    """Density (fraction of weights kept) of each layer for a target global ``sparsity``.

    ``shapes`` maps layer names to weight shapes. The budget ``(1 - sparsity) * sum(numel)`` covers
    every layer in ``shapes``, including the ``dense`` ones (density 1), so the global sparsity over
    ``shapes`` is the target (before the integer rounding of :func:`constant_fan_in`).

    * ``"uniform"``: every non-dense layer gets the same density.
    * ``"erk"`` (Erdos-Renyi-Kernel, Evci et al. 2020): density proportional to
      ``sum(shape) / prod(shape)`` (kernel dimensions included). A layer whose density would exceed 1
      is made dense and the others are rescaled, one layer at a time, until every density is <= 1.

    Raises ``ValueError`` when the layers named in ``dense`` alone exceed the budget.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    shapes = {str(n): _check_shape(n, s) for n, s in shapes.items()}
    if not shapes:
        raise ValueError("layer_densities: no layers given")
    forced = set(dense)
    unknown = sorted(forced - set(shapes))
    if unknown:
        raise ValueError(f"dense layers not in shapes: {unknown}")
    numel = {n: _numel(s) for n, s in shapes.items()}
    target = (1.0 - float(sparsity)) * sum(numel.values())
    dense_set = set(forced)

    def free_budget() -> float:
        return target - sum(numel[n] for n in dense_set)

    if free_budget() < -1e-9 * target:
        raise ValueError(
            f"the dense layers {sorted(forced)} hold {sum(numel[n] for n in forced)} weights, more than the "
            f"budget of {target:.0f} weights at sparsity {sparsity}"
        )
    while True:
        free = [n for n in shapes if n not in dense_set]
        if not free:
            break
        if distribution == "uniform":
            raw = {n: 1.0 for n in free}
        else:
            raw = {n: sum(shapes[n]) / numel[n] for n in free}
        eps = free_budget() / sum(raw[n] * numel[n] for n in free)
        top = max(raw.values())
        if eps * top <= 1.0:
            break
        # Only the layers at the maximum raw density go dense in one round: making them dense
        # shrinks the budget left for the others, which may bring those back under 1.
        dense_set.update(n for n in free if raw[n] == top)
    out = {}
    for n in shapes:
        out[n] = 1.0 if n in dense_set else max(0.0, min(1.0, eps * raw[n]))
    return out


def constant_fan_in(density: float, fan_in_dense: int) -> int:
    """Integer fan-in ``k`` for a layer of dense fan-in ``fan_in_dense`` kept at ``density``.

    ``round(density * fan_in_dense)`` (halves round up), at least 1 and at most ``fan_in_dense``.
    """
    fan_in_dense = int(fan_in_dense)
    if fan_in_dense <= 0:
        raise ValueError(f"fan_in_dense must be positive, got {fan_in_dense}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return max(1, min(fan_in_dense, math.floor(float(density) * fan_in_dense + 0.5)))


def layer_fan_ins(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]) -> dict[str, int]:
    """Constant fan-in ``k`` of each layer (see :func:`constant_fan_in`)."""
    return {n: constant_fan_in(densities[n], fan_in_dense(s)) for n, s in shapes.items()}


def layer_budgets(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], constant: bool = True
) -> dict[str, int]:
    """Number of live weights of each layer.

    ``constant=True`` (SRigL, StaticSparse and, for a fair comparison, our RigL): ``out * k``.
    ``constant=False``: ``round(density * numel)``, at least 1.
    """
    out = {}
    for n, s in shapes.items():
        s = tuple(s)
        if constant:
            out[n] = int(s[0]) * constant_fan_in(densities[n], fan_in_dense(s))
        else:
            out[n] = max(1, min(_numel(s), math.floor(float(densities[n]) * _numel(s) + 0.5)))
    return out


def achieved_sparsity(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], constant: bool = True
) -> float:
    """The exact global sparsity over ``shapes`` once the budgets are rounded to integers."""
    total = sum(_numel(tuple(s)) for s in shapes.values())
    live = sum(layer_budgets(shapes, densities, constant).values())
    return 1.0 - live / total


def random_constant_fan_in_mask(
    shape: Sequence[int], k: int, generator: Optional[torch.Generator] = None, device=None
) -> torch.Tensor:
    """Boolean mask of ``shape`` with exactly ``k`` live weights per neuron, uniformly at random."""
    shape = tuple(int(s) for s in shape)
    out, fan = shape[0], fan_in_dense(shape)
    if not 0 <= k <= fan:
        raise ValueError(f"k={k} outside [0, {fan}] for weight shape {shape}")
    scores = torch.rand(out, fan, generator=generator)
    idx = torch.topk(scores, k, dim=1).indices
    m = torch.zeros(out, fan, dtype=torch.bool)
    m.scatter_(1, idx, True)
    return m.reshape(shape).to(device)


def random_mask(
    shape: Sequence[int], nnz: int, generator: Optional[torch.Generator] = None, device=None
) -> torch.Tensor:
    """Boolean mask of ``shape`` with exactly ``nnz`` live weights anywhere, uniformly at random."""
    shape = tuple(int(s) for s in shape)
    n = _numel(shape)
    if not 0 <= nnz <= n:
        raise ValueError(f"nnz={nnz} outside [0, {n}] for weight shape {shape}")
    idx = torch.randperm(n, generator=generator)[:nnz]
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m.reshape(shape).to(device)


@torch.no_grad()
def sparse_init_(weight: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sparse Kaiming-normal init (Evci et al. 2022), in place: live weights ~ N(0, 2 / fan_in).

    ``fan_in`` is each neuron's own number of live weights (``k`` under constant fan-in), so the std
    is ``sqrt(2 / k)``. Weights outside ``mask`` are set to exactly 0.
    """
    out = weight.shape[0]
    if mask is None:
        mask = torch.ones_like(weight, dtype=torch.bool)
    m2 = mask.reshape(out, -1)
    fan = m2.sum(dim=1).clamp_min(1).to(torch.float64)
    std = (2.0 / fan).sqrt().to(weight.dtype).to(weight.device)
    dev = generator.device if generator is not None else weight.device
    draw = torch.randn(weight.shape, generator=generator, dtype=weight.dtype, device=dev).to(weight.device)
    w2 = draw.reshape(out, -1) * std[:, None] * m2.to(weight.dtype)
    weight.copy_(w2.reshape(weight.shape))
    return weight
