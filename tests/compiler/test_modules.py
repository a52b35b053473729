"""The modules optimize installs (sparse_compile.compiler.modules) against their dense / torch equivalents."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile import formats
from sparse_compile.compiler.modules import (
    CondensedConv2d,
    CondensedLinear,
    ConstantScatter,
    CSRConv2d,
    CSRLinear,
    ExplicitMultiheadAttention,
    StructuredConv2d,
    StructuredLinear,
    module_nbytes,
)


def constant_fan_in(shape, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, fan = shape[0], int(torch.tensor(shape[1:]).prod())
    mask = torch.zeros(out, fan, dtype=torch.bool)
    mask.scatter_(1, torch.rand(out, fan, generator=g).argsort(1)[:, :k], True)
    w = torch.randn(out, fan, generator=g, dtype=torch.float64) * mask
    return w.reshape(shape), mask.reshape(shape)


def close(a, b, tol=1e-12):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_condensed_linear_matches_dense(lead):
    w, mask = constant_fan_in((24, 40), 7)
    b = torch.randn(24, dtype=torch.float64)
    c = formats.to_condensed(w, mask, b)
    m = CondensedLinear(c.values, c.indices, c.bias, 40)
    x = torch.randn(*lead, 40, dtype=torch.float64)
    assert close(m(x), F.linear(x, w, b))
    assert m.k == 7 and m.indices.dtype == torch.int16
    assert not m.values.requires_grad


def test_condensed_conv2d_matches_dense():
    w, mask = constant_fan_in((12, 5, 3, 3), 9)
    b = torch.randn(12, dtype=torch.float64)
    c = formats.to_condensed(w, mask, b)
    m = CondensedConv2d(c.values, c.indices, c.bias, 5, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    assert close(m(x), F.conv2d(x, w, b, 2, 1))


def test_csr_linear_and_conv_match_dense():
    w, mask = constant_fan_in((16, 30), 4)
    csr = formats.to_csr(w, mask, active_only=False).csr
    b = torch.randn(16, dtype=torch.float64)
    x = torch.randn(3, 2, 30, dtype=torch.float64)
    m = CSRLinear(csr, b)
    assert close(m(x), F.linear(x, w, b))
    assert module_nbytes(m) < w.numel() * w.element_size()
    wc, mc = constant_fan_in((8, 3, 3, 3), 5)
    csrc = formats.to_csr(wc, mc, active_only=False).csr
    xc = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    mconv = CSRConv2d(csrc, None, 3, 3, stride=1, padding=1)
    assert close(mconv(xc), F.conv2d(xc, wc, None, 1, 1))
    with pytest.raises(ValueError, match="sparse CSR"):
        CSRLinear(w, b)


def test_structured_modules_are_plain_dense_layers():
    w = torch.randn(6, 4)
    m = StructuredLinear(w, torch.zeros(6))
    assert isinstance(m, nn.Linear) and m.in_features == 4 and m.out_features == 6
    assert torch.equal(m.weight, w) and m.weight.data_ptr() != w.data_ptr()  # owns its copy
    wc = torch.randn(6, 2, 3, 3)
    mc = StructuredConv2d(wc, None, stride=2, padding=1, groups=2)
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(mc(x), F.conv2d(x, wc, None, 2, 1, 1, 2))


@pytest.mark.parametrize("dim", [1, -1])
def test_constant_scatter(dim):
    idx = torch.tensor([0, 2, 3])
    fill = torch.tensor([9.0, 7.0, 8.0, 6.0, 5.0])
    s = ConstantScatter(dim, idx, fill)
    x = torch.randn(2, 3, 4) if dim == 1 else torch.randn(2, 4, 3)
    y = s(x)
    if dim == 1:
        assert y.shape == (2, 5, 4)
        assert torch.equal(y[:, idx], x)
        assert torch.all(y[:, 1] == 7.0) and torch.all(y[:, 4] == 5.0)
    else:
        assert y.shape == (2, 4, 5)
        assert torch.equal(y[..., idx], x)
        assert torch.all(y[..., 1] == 7.0) and torch.all(y[..., 4] == 5.0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_explicit_mha_matches_torch(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, dtype=torch.float64).eval()
    e = ExplicitMultiheadAttention.from_module(mha)
    shape = (2, 6, 32) if batch_first else (6, 2, 32)
    q = torch.randn(shape, dtype=torch.float64)
    kv = torch.randn((2, 5, 32) if batch_first else (5, 2, 32), dtype=torch.float64)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, -2:] = True
    am = torch.randn(6, 5, dtype=torch.float64)
    for kwargs in ({}, {"key_padding_mask": kpm}, {"attn_mask": am}, {"attn_mask": am > 1.0, "key_padding_mask": kpm}):
        with torch.no_grad():
            ref = mha(q, kv, kv, need_weights=need_weights, **kwargs)
            got = e(q, kv, kv, need_weights=need_weights, **kwargs)
        assert close(got[0], ref[0], 1e-10), kwargs
        if need_weights:
            assert close(got[1], ref[1], 1e-10)
        else:
            assert got[1] is None


def test_explicit_mha_separate_kv_dims_and_unbatched():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, dtype=torch.float64).eval()
    e = ExplicitMultiheadAttention.from_module(mha)
    q, k, v = (torch.randn(4, 16, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64),
               torch.randn(3, 12, dtype=torch.float64))
    with torch.no_grad():
        ref, refw = mha(q, k, v)
        got, gotw = e(q, k, v)
    assert close(got, ref, 1e-10) and close(gotw, refw, 1e-10)


def test_explicit_mha_calls_its_out_proj():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    e = ExplicitMultiheadAttention.from_module(mha)
    calls = []
    e.out_proj.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    e(torch.randn(1, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16), need_weights=False)
    assert calls == [torch.Size([1, 3, 16])]
    bad = nn.MultiheadAttention(16, 2, add_bias_kv=True)
    assert "add_bias_kv" in ExplicitMultiheadAttention.unsupported_reason(bad)
    with pytest.raises(ValueError, match="add_bias_kv"):
        ExplicitMultiheadAttention.from_module(bad)


def test_csr_op_compiles_fullgraph():
    w, mask = constant_fan_in((16, 30), 4)
    m = CSRLinear(formats.to_csr(w.float(), mask, active_only=False).csr, None)
    x = torch.randn(3, 30)
    torch._dynamo.reset()
    y = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert torch.allclose(y, F.linear(x, w.float()), atol=1e-5)
