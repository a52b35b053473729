"""``sparse_compile.load_checkpoint``: a trained checkpoint into a model, masks included; what a
checkpoint records about its model."""
import pytest
import torch
from safetensors.torch import save_file

import sparse_compile
from sparse_compile.checkpoint import checkpoint_metadata, example_path
from sparse_compile.models import create_model
from sparse_compile.train import SRigL


def _trained(tmp_path, metadata=None):
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10)
    SRigL(model, None, sparsity=0.9, total_steps=10).remove()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path, model


def test_load_checkpoint_restores_weights_and_masks(tmp_path):
    path, trained = _trained(tmp_path)
    fresh = create_model("mlp", num_classes=10)
    with pytest.raises(RuntimeError, match="weight_mask"):  # what a newcomer tries first
        create_model("mlp", num_classes=10).load_state_dict(sparse_compile.checkpoint.load_state_dict(path))
    assert sparse_compile.load_checkpoint(fresh, path) is fresh
    for name in ("fc1", "fc2", "fc3"):
        a, b = fresh.get_submodule(name), trained.get_submodule(name)
        assert a.weight_mask.dtype == torch.bool and torch.equal(a.weight_mask, b.weight_mask)
        assert torch.equal(a.weight, b.weight)
    table = sparse_compile.inspect(fresh)
    assert all(r.constant_fan_in for r in table) and abs(table.sparsity - sparse_compile.inspect(trained).sparsity) < 1e-9
    # mode "condensed" accepts it (it refuses a model whose masks were dropped)
    opt = sparse_compile.optimize(fresh.eval(), (torch.randn(2, 64),), mode="condensed", cache=False)
    assert "condensed" in opt.sparse_compile_report.forms().values()  # tiny layers stay dense by design


def test_load_checkpoint_from_a_state_dict_and_the_example():
    model = create_model("mlp", num_classes=10)
    sparse_compile.load_checkpoint(model, str(example_path()))
    table = sparse_compile.inspect(model)
    assert all(r.constant_fan_in for r in table) and table.sparsity > 0.85
    twin = create_model("mlp", num_classes=10)
    sparse_compile.load_checkpoint(twin, model.state_dict())
    assert torch.equal(twin.fc2.weight_mask, model.fc2.weight_mask)


def test_load_checkpoint_errors_name_the_keys(tmp_path):
    path, _ = _trained(tmp_path)
    with pytest.raises(ValueError, match=r"mask 'fc1.weight_mask' names no layer"):
        sparse_compile.load_checkpoint(torch.nn.Sequential(torch.nn.Linear(64, 300)), path)
    wrong = create_model("mlp", num_classes=7)
    with pytest.raises(ValueError, match="fc3.weight_mask"):  # shape mismatch of the head's mask
        sparse_compile.load_checkpoint(wrong, path)
    state = sparse_compile.checkpoint.load_state_dict(path)
    del state["fc2.bias"]
    with pytest.raises(ValueError, match=r"missing fc2\.bias"):
        sparse_compile.load_checkpoint(create_model("mlp", num_classes=10), state)
    model = create_model("mlp", num_classes=10)
    sparse_compile.load_checkpoint(model, state, strict=False)  # loads what fits
    assert model.fc1.weight_mask.dtype == torch.bool


def test_checkpoint_metadata(tmp_path):
    path, _ = _trained(tmp_path, metadata={"model": "mlp", "image_size": "32"})
    assert checkpoint_metadata(path) == {"model": "mlp", "image_size": 32}
    (tmp_path / "b").mkdir()
    bare, _ = _trained(tmp_path / "b")
    assert checkpoint_metadata(bare) == {}
    torch.save({"model": {}, "recipe": {"model": "resnet18_cifar", "name": "r", "method": "srigl"}},
               tmp_path / "c.pt")
    assert checkpoint_metadata(tmp_path / "c.pt")["model"] == "resnet18_cifar"
