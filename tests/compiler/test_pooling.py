"""Max-pooling in channels-last (compiler/pooling.py): bit-identical to torch, swapped in by optimize."""
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sparse_compile import load, optimize, save
from sparse_compile.compiler import whole_model
from sparse_compile.compiler.pooling import ChannelsLastMaxPool2d, channels_last_max_pool2d, swap_max_pools


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [3, 16, 64])
@pytest.mark.parametrize("args", [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 2, 1, 2, True), ((3, 2), (1, 2), 0, 1, True)])
def test_bit_identical_to_max_pool2d(dtype, channels, args):
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 13, 17, generator=g).to(dtype)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates the same way
    ref = F.max_pool2d(x, *args)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        y = channels_last_max_pool2d(inp, *args)
        assert y.is_contiguous() or not inp.is_contiguous()
        assert torch.equal(y.nan_to_num(), F.max_pool2d(inp, *args).nan_to_num())
        assert torch.isnan(y).sum() == torch.isnan(ref).sum()


def test_swap_replaces_plain_max_pools_only():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.MaxPool2d(2), nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True)),
                          nn.MaxPool2d(2, return_indices=True))
    assert swap_max_pools(model) == 2
    assert type(model[1]) is ChannelsLastMaxPool2d and type(model[2][0]) is ChannelsLastMaxPool2d
    assert model[2][0].ceil_mode and model[2][0].padding == 1
    assert type(model[3]) is nn.MaxPool2d  # indices: torch's own path
    assert swap_max_pools(model) == 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def _sparse_net():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        for m in (net.conv, net.fc):
            m.weight.mul_((torch.rand_like(m.weight) > 0.9).float())
    return net


def test_optimize_swaps_the_pool_says_so_and_round_trips(tmp_path):
    net, x = _sparse_net(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize(net, (x,), mode="condensed", pad_condensed=True)
    assert type(opt.pool) is ChannelsLastMaxPool2d
    assert any("max-pool layer(s) pool in channels-last" in n for n in opt.sparse_compile_report.notes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), net(x), rtol=1e-5, atol=1e-5)
        save(opt, tmp_path / "m.safetensors")
        back = load(tmp_path / "m.safetensors")
        assert type(back.pool) is ChannelsLastMaxPool2d
        assert torch.equal(back(x), opt(x))


def test_fx_traces_the_pool_as_one_call():
    # No data-dependent branch reaches FX: a model holding the pool can be traced again.
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 16, 1), ChannelsLastMaxPool2d(2)))
    assert channels_last_max_pool2d in [n.target for n in gm.graph.nodes]
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(gm(x), F.max_pool2d(gm.get_submodule("0")(x), 2))


def test_whole_model_check_times_the_original_with_the_same_pools(monkeypatch):
    # auto's whole-model check must not credit the sparse forms with the faster pooling: the
    # original it times pools in channels-last like every candidate.
    seen = []
    real = whole_model.time_models

    def spy(models, *a, **k):
        seen.append({name: type(m.get_submodule("pool")) for name, m in models.items()})
        return real(models, *a, **k)

    monkeypatch.setattr(whole_model, "time_models", spy)
    net, x = _sparse_net(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize(net, (x,), mode="auto", repeats=2)
    assert seen and all(t is ChannelsLastMaxPool2d for pools in seen for t in pools.values())
    assert type(net.pool) is nn.MaxPool2d  # the user's model is untouched
    assert type(opt.pool) is ChannelsLastMaxPool2d
