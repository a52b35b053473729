"""Round trips and validation of sparse_compile.formats."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparse_compile import formats as F


def constant_fan_in_weight(shape, k, n_ablated=0, gen=None, zero_live=False):
    """Random weight of `shape` with exactly k live entries per active row, n_ablated empty rows,
    and its mask. With zero_live, some live entries are exactly 0.0 (only the mask says they live)."""
    out, fan = shape[0], 1
    for s in shape[1:]:
        fan *= s
    w = torch.randn(out, fan, generator=gen, dtype=torch.float64)
    mask = torch.zeros(out, fan, dtype=torch.bool)
    for r in range(out):
        mask[r, torch.randperm(fan, generator=gen)[:k]] = True
    if n_ablated:
        mask[torch.randperm(out, generator=gen)[:n_ablated]] = False
    w = w * mask
    if zero_live and mask.any():
        first = torch.nonzero(mask)[0]
        w[first[0], first[1]] = 0.0
    return w.reshape(shape), mask.reshape(shape)


shapes = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 40)),  # linear
    st.tuples(st.integers(1, 8), st.integers(1, 5), st.sampled_from([1, 3]), st.sampled_from([1, 3])),  # conv
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, data=st.data())
def test_condensed_round_trip(shape, data):
    fan = 1
    for s in shape[1:]:
        fan *= s
    k = data.draw(st.integers(1, fan), label="k")
    n_abl = data.draw(st.integers(0, shape[0] - 1), label="ablated")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    w, m = constant_fan_in_weight(shape, k, n_abl, g, zero_live=data.draw(st.booleans()))
    bias = torch.randn(shape[0], dtype=w.dtype)
    c = F.to_condensed(w, m, bias, name="l")
    assert c.k == k and c.n_active == shape[0] - n_abl
    assert c.indices.dtype == torch.int16
    assert bool((c.indices[:, 1:] > c.indices[:, :-1]).all()) if k > 1 else True
    assert torch.equal(c.to_dense(), w)
    assert torch.equal(c.to_mask(), m)
    c2 = F.Condensed.from_tensors(c.values, c.indices, c.active_rows, c.weight_shape, c.bias, name="l")
    assert torch.equal(c2.to_dense(), w)
    a = F.to_ablated_dense(w, m, bias)
    assert a.weight.shape[0] == shape[0] - n_abl
    assert torch.equal(a.to_dense(), w)
    for active_only in (True, False):
        csr = F.to_csr(w, m, active_only=active_only)
        assert csr.csr.layout == torch.sparse_csr
        assert torch.equal(csr.to_dense(), w)
        assert csr.csr.values().numel() == int(m.sum())  # live zeros kept under a mask


def test_analysis_counts():
    w, m = constant_fan_in_weight((10, 20), 4, n_ablated=3, gen=torch.Generator().manual_seed(1))
    info = F.analyze(w, m, "fc")
    assert info.n_active == 7 and info.n_ablated == 3
    assert info.constant_fan_in and info.k == 4
    assert info.nnz == 28
    assert info.sparsity == pytest.approx(1 - 28 / 200)
    assert info.fan_in_dense == 20


def test_mask_wins_over_zero_testing():
    w = torch.zeros(2, 4)
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    w[0, 0] = 1.0  # w[0,1] and row 1 are live zeros
    assert F.analyze(w, m).k == 2
    assert F.analyze(w).n_active == 1  # without the mask, zeros are dead
    c = F.to_condensed(w, m)
    assert c.n_active == 2 and torch.equal(c.to_mask(), m)


def test_all_rows_ablated_but_one_and_empty_input():
    w, m = constant_fan_in_weight((6, 9), 2, n_ablated=5, gen=torch.Generator().manual_seed(2))
    c = F.to_condensed(w, m)
    assert c.n_active == 1 and torch.equal(c.to_dense(), w)
    empty = torch.zeros(0, 9)
    c0 = F.to_condensed(empty)
    assert c0.n_active == 0 and c0.to_dense().shape == (0, 9)
    z = torch.zeros(4, 5)  # every neuron ablated
    cz = F.to_condensed(z)
    assert cz.n_active == 0 and torch.equal(cz.to_dense(), z)


def test_grouped_conv_fan_in():
    conv = torch.nn.Conv2d(8, 6, 3, groups=2)
    info = F.analyze(conv.weight)
    assert info.fan_in_dense == 4 * 9


def test_int32_indices_when_int16_cannot_address():
    w = torch.zeros(2, 40000)
    w[:, -1] = 1.0
    w[:, 0] = 2.0
    c = F.to_condensed(w)
    assert c.indices.dtype == torch.int32 and torch.equal(c.to_dense(), w)
    with pytest.raises(ValueError, match="int16"):
        F.to_condensed(w, index_dtype=torch.int16)


def test_non_constant_fan_in_error_and_padding():
    w = torch.zeros(3, 6)
    w[0, :2] = 1.0
    w[1, :4] = torch.arange(1.0, 5.0)
    w[2, 5] = 3.0
    with pytest.raises(ValueError, match=r"'fc2'.*min 1, max 4"):
        F.to_condensed(w, name="fc2")
    c = F.to_condensed(w, name="fc2", pad=True)
    assert c.padded and c.k == 4
    assert torch.equal(c.to_dense(), w)
    assert torch.equal(c.to_mask(), w != 0)
    c.validate()  # pads keep rows sorted and unique


def _good():
    w, m = constant_fan_in_weight((5, 12), 3, n_ablated=1, gen=torch.Generator().manual_seed(3))
    return F.to_condensed(w, m, torch.randn(5, dtype=torch.float64), name="blk.fc")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.indices.__setitem__((0, 0), 12), "index out of range"),
        (lambda c: c.indices.__setitem__((0, 0), -1), "index out of range"),
        (lambda c: c.indices.__setitem__((1, 1), int(c.indices[1, 0])), "duplicate index"),
        (lambda c: setattr(c, "indices", c.indices.to(torch.int64)), "indices dtype"),
        (lambda c: setattr(c, "values", c.values.to(torch.int32)), "values dtype"),
        (lambda c: setattr(c, "values", c.values[:, :2]), r"values .* and indices"),
        (lambda c: setattr(c, "active_rows", c.active_rows[:2]), "active_rows has shape"),
        (lambda c: c.active_rows.__setitem__(0, 5), "active_rows out of range"),
        (lambda c: c.active_rows.__setitem__(1, int(c.active_rows[0])), "strictly increasing"),
        (lambda c: setattr(c, "bias", torch.zeros(4)), "bias must have shape"),
        (lambda c: setattr(c, "weight_shape", (5, 2)), "k=3 exceeds"),
    ],
)
def test_validation_names_layer_and_fault(mutate, match):
    c = _good()
    mutate(c)
    with pytest.raises(ValueError, match=match) as e:
        F.Condensed.from_tensors(c.values, c.indices, c.active_rows, c.weight_shape, c.bias, name=c.name)
    assert "'blk.fc'" in str(e.value)


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match="mask shape"):
        F.analyze(torch.ones(3, 4), torch.ones(4, 3, dtype=torch.bool), name="x")


def test_old_analysis_name_still_imports_with_a_warning():
    with pytest.warns(DeprecationWarning, match="WeightAnalysis"):
        old = F.LayerAnalysis
    assert old is F.WeightAnalysis
    assert isinstance(F.analyze(torch.ones(3, 4)), old)
    with pytest.raises(AttributeError, match="no_such_name"):
        F.no_such_name
