"""``optimize`` never silently changes a model: layers it does not understand exactly (subclasses
with their own ``forward``, hooks) are kept with the reason in the report, and with example inputs
the layers whose rewrite changes the output are found by bisection and kept (or, strict, raise)."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparse_compile.compiler import choose, optimize, relative_error
from sparse_models import random_srigl

timm = pytest.importorskip("timm", reason="the weight-standardised / 'same' convs under test are timm's")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


def _err(model, opt, x):
    with torch.no_grad():
        return relative_error(opt(x), model(x))


def _reasons(opt):
    return {r.name: r.reason for r in opt.sparse_compile_report}


def test_weight_standardised_same_conv_is_kept_in_csr_mode():
    from timm.layers import StdConv2d, StdConv2dSame

    model = random_srigl(nn.Sequential(
        StdConv2dSame(8, 32, 3, stride=2), nn.ReLU(), StdConv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10)))
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert model(x).abs().max() > 1  # a real signal, so an error would show
    opt = optimize(model, mode="csr")  # no example inputs: nothing verifies, the pass must know
    assert _err(model, opt, x) <= 1e-5
    f, why = opt.sparse_compile_report.forms(), _reasons(opt)
    assert f["0"] == "dense" and "StdConv2dSame overrides nn.Conv2d.forward" in why["0"]
    assert f["2"] == "dense" and "StdConv2d" in why["2"]
    assert f["4"] == "csr"  # the plain conv is still rewritten


def test_linear_with_a_forward_hook_is_kept():
    model = random_srigl(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                       nn.Linear(128, 10)))
    model[2].register_forward_hook(lambda m, a, out: out * 2 + 1)
    x = torch.randn(4, 64)
    for mode in ("condensed", "csr", "ablated_dense"):
        opt = optimize(model, mode=mode)
        assert _err(model, opt, x) <= 1e-5, mode
        assert opt.sparse_compile_report.forms()["2"] == "dense"
        assert "forward hook" in _reasons(opt)["2"]
        assert opt.sparse_compile_report.forms()["0"] == mode


def test_hook_on_a_block_survives_tracing_and_its_layers_are_swapped_inside():
    block = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    model = random_srigl(nn.Sequential(nn.Linear(32, 64), block, nn.Linear(64, 10)))
    block.register_forward_hook(lambda m, a, out: out.flip(-1))  # FX tracing through it would drop this
    x = torch.randn(3, 32)
    opt = optimize(model, mode="condensed")
    assert _err(model, opt, x) <= 1e-5
    rep = {r.name: r for r in opt.sparse_compile_report}
    assert rep["1.0"].form == "condensed" and "swapped in place inside Sequential" in rep["1.0"].reason


def test_pruned_layers_are_understood():
    model = random_srigl(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    mask = model[0].weight != 0
    prune.custom_from_mask(model[0], "weight", mask)
    x = torch.randn(3, 64)
    with torch.no_grad():
        model(x)  # prune's weight attribute, computed without grad, so the model can be deep-copied
    opt = optimize(model, mode="condensed")
    assert _err(model, opt, x) <= 1e-5
    assert opt.sparse_compile_report.forms()["0"] == "condensed"


class ReadsWeight(nn.Module):
    """A block that calls its layer and also reads its weight (so no replacement can serve), in a
    way the source check cannot see."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x) + getattr(self, "fc").weight.sum(0)


class ReadsWeightVisibly(ReadsWeight):
    def forward(self, x):
        return self.fc(x) + self.fc.weight.sum(0)


def test_layer_whose_weight_its_leaf_parent_reads_is_kept_without_inputs():
    model = random_srigl(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), ReadsWeightVisibly(), nn.Linear(64, 10)))
    opt = optimize(model, mode="condensed", leaf_modules=(ReadsWeightVisibly,))
    x = torch.randn(4, 32)
    assert _err(model, opt, x) <= 1e-5
    assert opt.sparse_compile_report.forms()["2.fc"] == "dense"
    assert "reads its weight / bias directly" in _reasons(opt)["2.fc"]


def test_batchnorm_act_is_not_mistaken_for_batchnorm():
    from timm.layers import BatchNormAct2d

    # Ablated channels of the first conv would be folded through the BatchNorm as if it were plain;
    # BatchNormAct2d also applies an activation. No example inputs: nothing would catch it.
    model = random_srigl(nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), BatchNormAct2d(64, act_layer=nn.Hardswish),
                                       nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(64 * 36, 10)))
    x = torch.randn(2, 16, 6, 6)
    for mode in ("ablated_dense", "condensed"):
        opt = optimize(model, mode=mode)
        assert _err(model, opt, x) <= 1e-5, mode


def _faulty_model():
    return random_srigl(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), ReadsWeight(), nn.ReLU(),
                                      nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))


@pytest.mark.parametrize("mode", ["condensed", "csr", "auto"])
def test_layer_at_fault_is_found_kept_and_named(mode, monkeypatch):
    # "auto" choosing dense for 2.fc would leave nothing at fault: per-layer timings are stubbed
    # (dense slowest), so the bisection, not the machine's noise, is under test.
    monkeypatch.setattr(choose, "time_form", lambda form, *a: 2e-3 if form == "dense" else 1e-3)
    model = _faulty_model()
    x = torch.randn(4, 32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = optimize(model, (x,), mode=mode, leaf_modules=(ReadsWeight,), repeats=1, warmup=0,
                       whole_model_check=False)
    assert _err(model, opt, x) <= 1e-5
    kept = [str(m.message) for m in w if "kept as they were" in str(m.message)]
    assert len(kept) == 1 and "2.fc" in kept[0]
    f = opt.sparse_compile_report.forms()
    assert f["2.fc"] == "dense" and "bisection" in _reasons(opt)["2.fc"]
    assert all("bisection" not in _reasons(opt)[n] for n in ("0", "4"))  # only the culprit is kept
    if mode != "auto":  # ("auto" may find dense fastest for a layer)
        assert f["0"] != "dense" and f["4"] != "dense"  # the rest is still optimized


def test_strict_raises_instead():
    model = _faulty_model()
    with pytest.raises(RuntimeError, match="strict=True"):
        optimize(model, (torch.randn(4, 32),), mode="condensed", leaf_modules=(ReadsWeight,), strict=True)
