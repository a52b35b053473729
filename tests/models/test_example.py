"""The shipped example checkpoint: a really trained 90% SRigL digits MLP, reproducible by its script."""
import json

import torch
from safetensors import safe_open

from sparse_compile.checkpoint import example_path, load_state_dict
from sparse_compile.train.data import load_digits
from sparse_compile.analysis.inspect import inspect
from sparse_compile.models import create_model


def _model_from(sd):
    model = create_model("mlp")
    for key, mask in sd.items():
        if key.endswith(".weight_mask"):
            model.get_submodule(key[: -len(".weight_mask")]).register_buffer("weight_mask", mask)
    model.load_state_dict(sd)
    return model.eval()


def test_example_is_a_trained_constant_fan_in_mlp():
    path = example_path()
    sd = load_state_dict(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "srigl" and meta["model"] == "mlp"
    table = inspect(sd)
    assert [r.name for r in table] == ["fc1", "fc2", "fc3"] and all(r.constant_fan_in for r in table)
    assert abs(table.sparsity - 0.9) < 0.005 and abs(table.sparsity - float(meta["sparsity"])) < 1e-5
    for r in table:  # weights outside the masks are exactly zero
        assert torch.all(sd[f"{r.name}.weight"][~sd[f"{r.name}.weight_mask"]] == 0)
    x, y = load_digits()[1].tensors
    with torch.no_grad():
        acc = float((_model_from(sd)(x).argmax(1) == y).float().mean())
    assert abs(acc - float(meta["test_accuracy"])) < 1e-6 and acc > 0.95
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["metadata"] == meta and sidecar["sparsifier"]["method"] == "SRigL"


def test_make_example_writes_a_loadable_checkpoint(tmp_path):
    from sparse_compile.models.make_example import make_example

    rep = make_example(tmp_path, epochs=1, progress=False)
    sd = load_state_dict(tmp_path / example_path().name)
    assert {"fc1.weight_mask", "fc2.weight_mask", "fc3.weight_mask"} <= set(sd)
    assert float(rep["metadata"]["test_accuracy"]) > 0.5
    assert (tmp_path / example_path().name).stat().st_mode & 0o044  # readable by group/others
