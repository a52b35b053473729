"""``sparse-compile optimize CHECKPOINT --model NAME ...``: prints the per-layer table and saves."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sparse_compile import cli, load
from sparse_compile.models import create_model
from sparse_compile.numerics import relative_error
from sparse_compile.train import SRigL


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=7)
    SRigL(model, None, sparsity=0.9, total_steps=100).remove()
    with torch.no_grad():  # ablate three neurons of fc1 (mask row off, bias non-zero)
        model.fc1.weight_mask[:3] = False
        model.fc1.weight[:3] = 0
        model.fc1.bias[:3] = 1.5
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


def test_optimize_cli_prints_table_and_saves(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "mlp.sc"
    rc = cli.main(["optimize", str(path), "--model", "mlp", "--mode", "auto", "--batch-size", "1",
                   "--device", "cpu", "-o", str(out), "--repeats", "2", "--no-whole-model-check"])
    text = capsys.readouterr().out
    assert rc == 0
    lines = text.splitlines()
    assert lines[0].startswith("auto: 3 layer(s) (") and "weights" in lines[0]  # the one-line summary
    assert lines[1].split()[:3] == ["layer", "shape", "sparse"]
    assert max(len(line) for line in lines if not line.startswith("saved ")) <= 100
    for name in ("fc1", "fc2", "fc3"):
        assert any(line.split()[0] == name for line in lines)
    fc1 = next(line for line in lines if line.split()[0] == "fc1")
    assert "reduced" in fc1  # its ablated neurons were dropped
    assert f"saved {out}" in text
    opt = load(out)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
        assert relative_error(opt(x), ref) <= 1e-5
    assert opt.get_submodule("fc3").out_features == 7  # num_classes read from the head weight


def test_optimize_cli_json_and_errors(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    rc = cli.main(["optimize", str(path), "--model", "mlp", "--mode", "condensed", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["mode"] == "condensed" and d["output"].endswith("mlp.sc.safetensors")
    assert {lay["name"]: lay["form"] for lay in d["layers"]}["fc1"] == "condensed"
    assert cli.main(["optimize", str(path), "--model", "mlp", "--mode", "fastest"]) == 1
    assert "--mode must be one of" in capsys.readouterr().err
    assert cli.main(["optimize", str(path), "--model", "resnet18_cifar"]) == 1
    assert "checkpoint" in capsys.readouterr().err


def test_optimize_cli_infers_the_model_a_checkpoint_records(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    rc = cli.main(["optimize", str(path), "--mode", "dense", "-o", str(tmp_path / "a.sc")])
    assert rc == 1 and "does not record its model" in capsys.readouterr().err
    recorded = tmp_path / "recorded.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(recorded), metadata={"model": "mlp"})
    rc = cli.main(["optimize", str(recorded), "--mode", "condensed", "-o", str(tmp_path / "b.sc")])
    cap = capsys.readouterr()
    assert rc == 0 and "'mlp' (recorded in the checkpoint)" in cap.err
    assert any(line.split()[:1] == ["fc1"] and "condensed" in line for line in cap.out.splitlines())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_optimize_cli_cuda_without_cuda_is_our_one_line_error(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert cli.main(["optimize", str(path), "--model", "mlp", "--device", "cuda", "-o", str(tmp_path / "c.sc")]) == 1
    err = capsys.readouterr().err
    assert "cuda" in err and "CUDA is not available on this machine" in err and len(err.strip().splitlines()) == 1
    assert "driver" not in err.lower()
