"""Grouped and depthwise convs: a grouped conv with constant fan-in per output channel is a
groups=1 condensed (or CSR) conv whose indices are offset to each output channel's group block."""
import pytest
import torch
from torch import nn

from sparse_compile.compiler import optimize, relative_error
from sparse_models import random_srigl


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


# (in, out, groups, kernel, stride, dilation): grouped, depthwise, depthwise with a channel multiplier.
CASES = [(32, 64, 4, 3, 1, 1), (48, 48, 3, 3, 2, 1), (32, 32, 32, 3, 1, 1), (16, 48, 16, 5, 1, 2), (64, 64, 8, 1, 1, 1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "in{}-out{}-g{}-k{}-s{}-d{}".format(*c))
@pytest.mark.parametrize("mode", ["condensed", "csr"])
def test_grouped_conv_exact(case, mode):
    cin, cout, g, k, s, d = case
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=d * (k // 2), dilation=d, groups=g)
    model = random_srigl(nn.Sequential(conv, nn.ReLU(), nn.Conv2d(cout, 8, 1)), sparsity=0.8)
    x = torch.randn(2, cin, 11, 11)
    opt = optimize(model, (x,), mode=mode, min_numel=0, strict=True)
    with torch.no_grad():
        assert relative_error(opt(x), model(x)) <= 1e-5
    r = opt.sparse_compile_report[0]
    assert r.form == mode and r.ablated > 0  # ablated output channels are computed as their bias
    m = opt.get_submodule("0")
    assert m.in_channels == cin  # one groups=1 conv over every input channel


def test_grouped_indices_widen_past_int16():
    # Local fan-in 64*9 fits int16; the full fan-in 4096*9 does not: indices must be int32.
    conv = nn.Conv2d(4096, 128, 3, padding=1, groups=64)
    model = random_srigl(nn.Sequential(conv))
    x = torch.randn(1, 4096, 3, 3)
    opt = optimize(model, (x,), mode="condensed", strict=True)
    m = opt.get_submodule("0")
    assert m.indices.dtype == torch.int32 and int(m.indices.max()) > 2**15
    with torch.no_grad():
        assert relative_error(opt(x), model(x)) <= 1e-5


def test_grouped_conv_in_auto_is_exact():
    model = random_srigl(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=8), nn.ReLU(),
                                       nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Flatten(), nn.Linear(64 * 36, 10)))
    x = torch.randn(1, 64, 6, 6)
    opt = optimize(model, (x,), mode="auto", repeats=1, warmup=0, whole_model_check=False, min_numel=0, strict=True)
    rep = {r.name: r for r in opt.sparse_compile_report}
    assert "condensed" in rep["0"].times_us  # the grouped conv's condensed form was a candidate
    with torch.no_grad():
        assert relative_error(opt(x), model(x)) <= 1e-5
