"""Layer-wise sparsity distributions, integer fan-in budgets and sparse init (sparse_compile.train.budgets)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_compile.train.budgets import (
    achieved_sparsity,
    constant_fan_in,
    fan_in_dense,
    layer_budgets,
    layer_densities,
    layer_fan_ins,
    random_constant_fan_in_mask,
    random_mask,
    sparse_init_,
)

CNN = {
    "conv1": (64, 3, 3, 3),
    "layer1.conv": (64, 64, 3, 3),
    "layer2.conv": (128, 64, 3, 3),
    "layer3.conv": (256, 128, 3, 3),
    "down": (256, 128, 1, 1),
    "fc": (10, 256),
}


def _global_density(shapes, dens):
    total = sum(math.prod(s) for s in shapes.values())
    return sum(dens[n] * math.prod(s) for n, s in shapes.items()) / total


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_distribution_meets_the_target_exactly(distribution, sparsity):
    dens = layer_densities(CNN, sparsity, distribution)
    assert all(0 < d <= 1 for d in dens.values())
    assert _global_density(CNN, dens) == pytest.approx(1 - sparsity, rel=1e-12)


def test_uniform_is_uniform_and_erk_follows_the_kernel_aware_ratio():
    u = layer_densities(CNN, 0.9, "uniform")
    assert all(d == pytest.approx(0.1, rel=1e-12) for d in u.values())
    e = layer_densities(CNN, 0.9, "erk")
    sparse = [n for n, d in e.items() if d < 1]
    # density / (sum(shape)/prod(shape)) is the same constant for every non-dense layer, with the
    # kernel dimensions in both sums (a 1x1 and a 3x3 conv with the same channels differ by ~9x).
    ratios = {n: e[n] / (sum(CNN[n]) / math.prod(CNN[n])) for n in sparse}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()), rel=1e-12)
    assert e["down"] / e["layer3.conv"] == pytest.approx((384 + 2) / (256 * 128) / ((384 + 6) / (256 * 128 * 9)))


def test_erk_redistribution_loop_by_hand():
    # Hand-computed: raw densities 1/100+1/100=0.02 (a: 100x100), 0.2 (b: 10x10) and 0.5 (c: 4x1).
    # Budget at 80% sparsity: 0.2 * 10104 = 2020.8 weights. Without the loop eps = 2020.8 / (200 + 20
    # + 2) = 9.1027 would give b and c densities > 1. Round 1 makes c dense (largest raw density):
    # eps = (2020.8 - 4) / 220 = 9.1673 -> b still > 1. Round 2 makes b dense: eps = (2020.8 - 104)
    # / 200 = 9.584, so a gets 0.19168.
    shapes = {"a": (100, 100), "b": (10, 10), "c": (4, 1)}
    d = layer_densities(shapes, 0.8, "erk")
    assert d["c"] == 1.0 and d["b"] == 1.0
    assert d["a"] == pytest.approx((0.2 * 10104 - 104) / 10000, rel=1e-12)


def test_forced_dense_layers_count_in_the_budget():
    d = layer_densities(CNN, 0.9, "uniform", dense=["conv1"])
    assert d["conv1"] == 1.0
    assert _global_density(CNN, d) == pytest.approx(0.1, rel=1e-12)
    assert d["fc"] < 0.1  # the others pay for the dense first layer
    with pytest.raises(ValueError, match="more than the budget"):
        layer_densities({"a": (10, 10), "b": (10, 1)}, 0.5, "erk", dense=["a"])
    with pytest.raises(ValueError, match="not in shapes"):
        layer_densities(CNN, 0.9, dense=["nope"])


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity="0.9"),
                                 dict(distribution="erdos")])
def test_bad_arguments(bad):
    kw = dict(sparsity=0.9, distribution="erk") | bad
    with pytest.raises(ValueError):
        layer_densities(CNN, **kw)


def test_bad_shape_names_the_layer():
    with pytest.raises(ValueError, match="'w'"):
        layer_densities({"w": (10,)}, 0.5)


def test_constant_fan_in_rounding_and_clamps():
    assert constant_fan_in(0.1, 64) == 6  # 6.4
    assert constant_fan_in(0.1, 65) == 7  # 6.5 rounds up
    assert constant_fan_in(1e-6, 64) == 1  # never 0
    assert constant_fan_in(1.0, 64) == 64
    with pytest.raises(ValueError):
        constant_fan_in(1.5, 64)
    with pytest.raises(ValueError):
        constant_fan_in(0.5, 0)


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_achieved_sparsity_is_what_the_masks_hold(distribution):
    dens = layer_densities(CNN, 0.9, distribution)
    ks = layer_fan_ins(CNN, dens)
    masks = {n: random_constant_fan_in_mask(s, ks[n]) for n, s in CNN.items()}
    live = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert achieved_sparsity(CNN, dens) == 1 - live / total
    assert layer_budgets(CNN, dens) == {n: int(m.sum()) for n, m in masks.items()}
    # Off the target by at most the rounding of k: half a weight per neuron.
    assert abs(achieved_sparsity(CNN, dens) - 0.9) <= sum(s[0] for s in CNN.values()) / 2 / total
    unstructured = achieved_sparsity(CNN, dens, constant=False)
    assert abs(unstructured - 0.9) <= len(CNN) / total


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3])), min_size=1, max_size=6),
    st.floats(0.0, 0.995),
    st.sampled_from(["erk", "uniform"]),
)
def test_distribution_property(layers, sparsity, distribution):
    shapes = {f"l{i}": (o, i_, k, k) for i, (o, i_, k) in enumerate(layers)}
    dens = layer_densities(shapes, sparsity, distribution)
    assert all(0 <= d <= 1 for d in dens.values())
    assert _global_density(shapes, dens) == pytest.approx(1 - sparsity, rel=1e-9, abs=1e-12)
    for n, s in shapes.items():
        k = constant_fan_in(dens[n], fan_in_dense(s))
        assert k >= 1 and k <= fan_in_dense(s)


def test_random_masks_have_exact_counts():
    m = random_constant_fan_in_mask((32, 8, 3, 3), 5)
    assert m.dtype == torch.bool and m.shape == (32, 8, 3, 3)
    assert (m.reshape(32, -1).sum(1) == 5).all()
    r = random_mask((40, 50), 123)
    assert int(r.sum()) == 123
    with pytest.raises(ValueError):
        random_constant_fan_in_mask((4, 4), 5)


def test_sparse_init_std_is_sqrt_2_over_k():
    w = torch.empty(2000, 1000)
    k = 50
    mask = random_constant_fan_in_mask(w.shape, k)
    sparse_init_(w, mask)
    assert (w[~mask] == 0).all()
    live = w[mask]
    assert live.std().item() == pytest.approx(math.sqrt(2 / k), rel=0.02)
    assert abs(live.mean().item()) < 0.01
    # Not the reference implementation's 2/k.
    assert abs(live.std().item() - 2 / k) > 0.1


def test_sparse_init_uses_each_neurons_fan_in():
    w = torch.empty(400, 800)
    mask = torch.zeros(400, 800, dtype=torch.bool)
    mask[:200, :8] = True  # fan-in 8
    mask[200:, :200] = True  # fan-in 200
    sparse_init_(w, mask)
    assert w[:200, :8].std().item() == pytest.approx(0.5, rel=0.06)
    assert w[200:, :200].std().item() == pytest.approx(0.1, rel=0.03)
