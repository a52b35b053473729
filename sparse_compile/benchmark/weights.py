"""The weights a layer benchmark runs on: a random SRigL-like layer, or one layer of a checkpoint.

:func:`srigl_like_mask` is the one maker of random SRigL-like masks (constant fan-in, ablated
neurons) that the benchmarks, ``sparse-compile flops`` and the tests share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


def parse_shape(s: str) -> tuple:
    """``"768x3072"`` -> ``(768, 3072)``: out features x in features (the weight's shape)."""
    try:
        out, inp = (int(p) for p in str(s).lower().split("x"))
    except ValueError:
        raise ValueError(f"layer shape {s!r}: expected OUTxIN, e.g. 768x3072 (ViT-B/16 fc2)") from None
    if out <= 0 or inp <= 0:
        raise ValueError(f"layer shape {s!r}: sizes must be positive")
    return out, inp


@dataclass
class BenchWeights:
    """A sparse Linear layer to benchmark: masked weight ``[out, in]``, mask, bias, provenance."""

    name: str
    weight: Tensor  # zero outside the mask
    mask: Tensor  # bool, weight's shape
    bias: Optional[Tensor]
    source: str  # "random constant fan-in" or "checkpoint <path>"
    target_sparsity: float

    def analysis(self):
        """:func:`sparse_compile.formats.analyze` of the weight under its mask."""
        from sparse_compile.formats import analyze

        return analyze(self.weight, self.mask, self.name)

    def describe(self) -> dict:
        """The layer's structure as stored in every result row."""
        a = self.analysis()
        return {
            "layer": self.name,
            "out_features": a.out_features,
            "in_features": a.fan_in_dense,
            "sparsity": round(self.target_sparsity, 6),
            "actual_sparsity": round(a.sparsity, 6),
            "n_active": a.n_active,
            "n_ablated": a.n_ablated,
            "k": a.k if a.k is not None else -1,
            "weights": self.source,
        }


def n_ablated_for(out: int, ablated_fraction: float) -> int:
    """How many of ``out`` neurons an SRigL-like layer ablates: ``round(ablated_fraction * out)``, at
    most ``out - 1`` (a layer keeps at least one neuron)."""
    if not 0.0 <= ablated_fraction < 1.0:
        raise ValueError(f"ablated_fraction must be in [0, 1), got {ablated_fraction}")
    return min(out - 1, int(round(ablated_fraction * out)))


def srigl_like_mask(shape: Sequence[int], budget: int, n_ablated: int = 0,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """A random constant fan-in mask of ``shape`` as SRigL leaves it after ablating neurons.

    ``n_ablated`` neurons (chosen at random) are ablated (whole row off) and, as SRigL does, the
    layer's weight ``budget`` is spread over the active ones: each keeps ``k = budget // n_active``
    live weights (at least 1, at most the dense fan-in), at random positions. ``shape`` is a Linear
    ``[out, in]`` or Conv ``[out, in/groups, *kernel]`` weight shape. This is the one SRigL-like mask
    maker of the package, the benchmarks and the tests.
    """
    from sparse_compile.train.budgets import fan_in_dense, random_constant_fan_in_mask

    shape = tuple(int(d) for d in shape)
    out, fan = shape[0], fan_in_dense(shape)
    if not 0 <= n_ablated < out:
        raise ValueError(f"n_ablated={n_ablated} outside [0, {out - 1}] for weight shape {shape}")
    n_act = out - n_ablated
    k = max(1, min(fan, int(budget) // n_act))
    active = torch.randperm(out, generator=generator)[:n_act].sort().values
    mask = torch.zeros(out, fan, dtype=torch.bool)
    mask[active] = random_constant_fan_in_mask((n_act, fan), k, generator=generator)
    return mask.reshape(shape)


def random_layer(out: int, inp: int, sparsity: float, ablated_fraction: float = 0.1, bias: bool = True,
                 seed: int = 0, name: Optional[str] = None) -> BenchWeights:
    """A constant fan-in layer with SRigL's statistics, as if trained with neuron ablation.

    ``round(ablated_fraction * out)`` neurons (chosen at random) are ablated and, as SRigL does, the
    layer's weight budget ``out * k`` (``k`` from ``sparsity`` over all neurons) is spread over the
    active ones, whose fan-in grows to ``floor(budget / n_active)`` (at most ``inp``): see
    :func:`srigl_like_mask`. Live weights are ``N(0, 2/k)`` (sparse Kaiming init), bias ``N(0, 0.1^2)``.
    """
    from sparse_compile.train.budgets import constant_fan_in, sparse_init_

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    g = torch.Generator().manual_seed(seed)
    n_abl = n_ablated_for(out, ablated_fraction)
    mask = srigl_like_mask((out, inp), out * constant_fan_in(1.0 - sparsity, inp), n_abl, generator=g)
    w = torch.empty(out, inp)
    sparse_init_(w, mask, generator=g)
    b = torch.randn(out, generator=g) * 0.1 if bias else None
    return BenchWeights(name or f"{out}x{inp}", w, mask, b, "random constant fan-in", float(sparsity))


def checkpoint_layer(path, layer: Optional[str] = None) -> BenchWeights:
    """A trained layer from a checkpoint: ``<layer>.weight``, ``<layer>.weight_mask`` (if saved), bias.

    ``layer`` may be omitted when the checkpoint holds a single 2-D weight with a mask; otherwise a
    ``KeyError`` lists the candidates.
    """
    from sparse_compile.checkpoint import load_state_dict
    from sparse_compile.formats import analyze

    sd = load_state_dict(path)
    linear = sorted(k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2)
    masked = [n for n in linear if f"{n}.weight_mask" in sd]
    if layer is None:
        if len(masked) != 1:
            raise KeyError(f"{path}: pick a layer with --layer; 2-D sparse weights: {masked or linear}")
        layer = masked[0]
    if f"{layer}.weight" not in sd:
        raise KeyError(f"{path}: no weight {layer + '.weight'!r}; 2-D weights: {linear}")
    w = sd[f"{layer}.weight"].float()
    if w.dim() != 2:
        raise ValueError(f"{path}: layer {layer!r} has a {w.dim()}-D weight; the layer benchmark takes Linear layers")
    m = sd.get(f"{layer}.weight_mask")
    mask = (m.bool() if m is not None else (w != 0))
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"{path}: layer {layer!r}: mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    w = w * mask
    b = sd.get(f"{layer}.bias")
    a = analyze(w, mask, layer)
    return BenchWeights(layer, w, mask, None if b is None else b.float(), f"checkpoint {path}", a.sparsity)
