"""Each propagation rule, checked for exactness AND for the width it leaves.

A rule that wrongly fell back to the full width would still be exact, so every case also says
what the consumer must see: only the kept inputs (the removal went through) or all of them (a
scatter restored the full width, and the report says where).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile import optimize

ABLATED = (0, 2, 5)  # producer neurons whose weights are all zero (their output is the bias)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


def ablate(layer: nn.Module) -> nn.Module:
    """Zero some output neurons' weights; their (non-zero) bias makes them constants."""
    with torch.no_grad():
        layer.weight[list(ABLATED)] = 0
        layer.bias.uniform_(0.5, 1.0)
    return layer


class ConvThen(nn.Module):
    """conv (8 channels, 3 ablated) -> ``between`` -> ``head``."""

    def __init__(self, between, head, pre=nn.Identity()):
        super().__init__()
        self.conv = ablate(nn.Conv2d(3, 8, 3))
        self.pre = pre
        self.between = between
        self.head = head

    def forward(self, x):
        return self.head(self.between(self.pre(self.conv(x))))


class Fn(nn.Module):
    """A module around a function, so the function is traced as graph nodes."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def bn():
    m = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


def run(model, x):
    """Optimize with ablated-dense layers; check exactness; the report."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
        opt = optimize(model, (x,), mode="ablated_dense")
        torch.testing.assert_close(opt(x), ref, rtol=1e-5, atol=1e-5)
    return opt.sparse_compile_report


def layer(rep, name):
    return next(r for r in rep if r.name == name)


def kept(rep, name) -> tuple:
    k, total = layer(rep, name).inputs_kept.split("/")
    return int(k), int(total)


def assert_reduced(rep, producer, consumer, per_channel=1):
    """The producer's ablated neurons are gone and the consumer lost exactly their inputs."""
    assert layer(rep, producer).output == "reduced"
    k, total = kept(rep, consumer)
    assert (k, total) == (total - len(ABLATED) * per_channel, total)
    assert rep.restores == []


def assert_full(rep, producer, consumer):
    """The consumer sees every input: a restore the report names, or (when no consumer could take
    the reduction) a producer that computes its ablated rows itself."""
    k, total = kept(rep, consumer)
    assert k == total
    assert rep.restores or layer(rep, producer).output != "reduced"


CASES = {
    "batchnorm": (ConvThen(nn.Sequential(bn(), nn.ReLU()), nn.Conv2d(8, 4, 1)), 1),
    "activations": (ConvThen(nn.Sequential(nn.GELU(), nn.Dropout(0.1), nn.SiLU(), nn.Identity()),
                             nn.Conv2d(8, 4, 1)), 1),
    "mean": (ConvThen(Fn(lambda t: t.mean((2, 3))), nn.Linear(8, 4)), 1),
    "amax": (ConvThen(Fn(lambda t: torch.amax(t, dim=(2, 3))), nn.Linear(8, 4)), 1),
    "view with size(0)": (ConvThen(Fn(lambda t: t.view(t.size(0), -1)), nn.Linear(8 * 4 * 4, 4)), 16),
    "reshape": (ConvThen(Fn(lambda t: t.reshape(t.size(0), -1)), nn.Linear(8 * 4 * 4, 4)), 16),
    "flatten": (ConvThen(nn.Flatten(), nn.Linear(8 * 4 * 4, 4)), 16),
    "torch.flatten": (ConvThen(Fn(lambda t: torch.flatten(t, 1)), nn.Linear(8 * 4 * 4, 4)), 16),
    "avgpool padding, count_include_pad=False": (
        ConvThen(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.Conv2d(8, 4, 1)), 1),
    "F.avg_pool2d without padding": (ConvThen(Fn(lambda t: F.avg_pool2d(t, 2)), nn.Conv2d(8, 4, 1)), 1),
    "maxpool": (ConvThen(nn.MaxPool2d(2), nn.Conv2d(8, 4, 1)), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rule_keeps_the_reduction(case):
    model, per_channel = CASES[case]
    rep = run(model, torch.randn(2, 3, 6, 6))
    assert_reduced(rep, "conv", "head", per_channel)


def test_linear_chain_through_activations():
    model = nn.Sequential(ablate(nn.Linear(16, 8)), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 4))
    rep = run(model, torch.randn(3, 16))
    assert_reduced(rep, "0", "3")


FULL = {
    "avgpool counting padding": ConvThen(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(8, 4, 1)),
    "reshape into the channel dim": ConvThen(Fn(lambda t: t.reshape(t.size(0), 2, -1).sum(1)),
                                             nn.Linear(4 * 16, 4)),
    "size of the channel dim": ConvThen(Fn(lambda t: t * t.size(1)), nn.Conv2d(8, 4, 1)),
    "residual add": ConvThen(Fn(lambda t: t + t.mean(1, keepdim=True)), nn.Conv2d(8, 4, 1)),
    "padded conv after a non-zero constant": ConvThen(nn.Identity(), nn.Conv2d(8, 4, 3, padding=1)),
}


@pytest.mark.parametrize("case", list(FULL))
def test_rule_restores_the_full_width_where_it_must(case):
    rep = run(FULL[case], torch.randn(2, 3, 6, 6))
    assert_full(rep, "conv", "head")
