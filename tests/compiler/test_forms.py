"""A form registered from outside the package, with the public API only."""
import pytest
import torch
from torch import nn

import sparse_compile
from sparse_compile.compiler import FORMS, FormHandler, LayerPlan


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


def toy_unavailable(plan: LayerPlan, cfg):
    """The toy form serves Linear layers only."""
    return None if plan.kind == "linear" else "the toy form takes Linear layers only"


def toy_build(plan: LayerPlan, cfg):
    """A plain nn.Linear over what the layer computes (its kept inputs, its dropped inputs' fold)."""
    e = plan.effective("toy")
    lin = nn.Linear(e["weight"].shape[1], e["weight"].shape[0], bias=e["bias"] is not None)
    with torch.no_grad():
        lin.weight.copy_(e["weight"])
        if e["bias"] is not None:
            lin.bias.copy_(e["bias"])
    return lin


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc1 = nn.Linear(16 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(torch.relu(self.conv(x)), 1))))


def test_register_a_form_from_outside():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for m in (model.conv, model.fc1, model.fc2):
            m.weight.mul_(torch.rand_like(m.weight) < 0.2)  # sparse, so "auto" considers the forms
    x = torch.randn(2, 3, 6, 6)
    sparse_compile.register_form(FormHandler("toy", toy_unavailable, toy_build, "nn.Linear, from a test"))
    try:
        opt = sparse_compile.optimize(model, (x,), mode="auto", auto_forms=("ablated_dense", "toy"), min_numel=1,
                                      repeats=1, warmup=0, whole_model_check=False)
    finally:
        FORMS.pop("toy")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)
    rep = {r.name: r for r in opt.sparse_compile_report}
    for name in ("fc1", "fc2"):
        assert "toy" in rep[name].times_us, f"{name}: the toy form was not timed ({rep[name].reason})"
    assert "toy" not in rep["conv"].times_us
    assert "toy: the toy form takes Linear layers only" in rep["conv"].reason


def test_auto_forms_must_name_registered_forms():
    with pytest.raises(ValueError, match="unknown form"):
        sparse_compile.OptimizeConfig(auto_forms=("toy",))
