"""``torch.compile(model, backend="sparse_compile")``: found by entry point, rewrites, matches."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from sparse_compile.compiler import relative_error
from sparse_models import srigl_init

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))
    torch._dynamo.reset()


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 10)).eval()


def test_entry_point_found_without_import():
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import list_backends, lookup_backend\n"
        "assert 'sparse_compile' not in sys.modules\n"
        "assert 'sparse_compile' in list_backends(), list_backends()\n"
        "fn = lookup_backend('sparse_compile')\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sparse_compile.compiler.backend", "sparse_compile_backend"]


@pytest.mark.slow
def test_mlp_matches_and_is_rewritten():
    model = srigl_init(mlp())
    x = torch.randn(3, 64)
    reports = []
    c = torch.compile(model, backend="sparse_compile", options={"mode": "condensed", "model": model,
                                                                "reports": reports})
    with torch.no_grad():
        assert relative_error(c(x), model(x)) <= RTOL
    (report,) = reports  # one graph, no graph break
    forms = report.forms()
    assert forms["0"] == "condensed" and forms["2"] == "condensed"  # named after the model's layers
    assert all(r.output == "reduced" for r in report if r.ablated and r.name != "4")


@pytest.mark.slow
def test_resnet18_matches():
    model = srigl_init(torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():  # ablated conv1 channels: bn1 + relu give exactly 0, so the padded conv2 can drop them
        for blk in (model.layer1[0], model.layer2[1]):
            dead = ~blk.conv1.weight_mask.flatten(1).any(1)
            blk.bn1.bias[dead] = -3.0
    x = torch.randn(1, 3, 32, 32)
    reports = []
    c = torch.compile(model, backend="sparse_compile", options={"mode": "ablated_dense", "model": model,
                                                                "reports": reports})
    with torch.no_grad():
        assert relative_error(c(x), model(x)) <= RTOL
    rep = {r.name: r for r in reports[-1]}
    # Dynamo's functional batch_norm became a module again, so the reduction went through it.
    for blk in ("layer1.0", "layer2.1"):
        assert rep[f"{blk}.conv1"].output == "reduced"
        kept, total = map(int, rep[f"{blk}.conv2"].inputs_kept.split("/"))
        assert kept == rep[f"{blk}.conv1"].active < total


def test_masks_from_zeros_without_model_option():
    model = srigl_init(mlp())
    with torch.no_grad():  # a live weight that is exactly 0: zero-testing sees a non-constant fan-in
        live = model[2].weight_mask.nonzero()[0]
        model[2].weight[live[0], live[1]] = 0.0
    x = torch.randn(2, 64)
    reports = []
    c = torch.compile(model, backend="sparse_compile", options={"mode": "condensed", "inductor": False,
                                                                "reports": reports})
    with torch.no_grad():
        assert relative_error(c(x), model(x)) <= RTOL
    assert reports[-1].forms()["2"] == "condensed"  # padded to the max fan-in, still exact


def test_reports_option_must_be_a_list():
    c = torch.compile(mlp(), backend="sparse_compile", options={"mode": "dense", "reports": "no"})
    with pytest.raises(Exception, match="'reports' must be a list"):
        c(torch.randn(1, 64))



def test_bad_option_is_a_clear_error():
    model = mlp()
    c = torch.compile(model, backend="sparse_compile", options={"mdoe": "auto"})
    with pytest.raises(Exception, match="unknown option.*mdoe"):
        c(torch.randn(1, 64))
