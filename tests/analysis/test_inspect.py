"""sparse_compile.inspect on real architectures sparsified with constant fan-in."""
import json

import torch
import torchvision
from torch import nn

import sparse_compile
from sparse_compile.formats import analyze


def sparsify_constant_fan_in(model, density=0.1, ablate_every=7, seed=0):
    """Give every Linear/Conv2d a `weight_mask` with constant fan-in; ablate every n-th neuron."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.reshape(m.weight.shape[0], -1)
                k = max(1, round(density * w.shape[1]))
                mask = torch.zeros_like(w, dtype=torch.bool)
                scores = torch.rand(w.shape, generator=g)
                mask.scatter_(1, scores.topk(k, dim=1).indices, True)
                mask[::ablate_every] = False
                mask[0] = True if k == w.shape[1] else mask[0]
                mask = mask.reshape(m.weight.shape)
                m.weight.mul_(mask)
                m.register_buffer("weight_mask", mask)
    return model


def test_inspect_resnet18_masks():
    model = sparsify_constant_fan_in(torchvision.models.resnet18(num_classes=10))
    rep = sparse_compile.inspect(model)
    convs = [r for r in rep if r.kind == "conv2d"]
    assert len(convs) == 20 and len([r for r in rep if r.kind == "linear"]) == 1
    for r in rep:
        mod = model.get_submodule(r.name)
        info = analyze(mod.weight, mod.weight_mask)
        assert r.constant_fan_in
        assert r.fan_in_min == r.fan_in_max == info.k
        assert r.ablated == info.n_ablated > 0
        assert r.active + r.ablated == mod.weight.shape[0]
        assert r.bytes_condensed < r.bytes_dense_fp32
    conv1 = next(r for r in rep if r.name == "conv1")
    assert conv1.shape == (64, 3, 7, 7) and conv1.fan_in_max == round(0.1 * 147)
    d = json.loads(rep.to_json())
    assert d["layers"][0]["name"] == "conv1" and 0.85 < d["global_sparsity"] < 0.95
    text = str(rep)
    assert "conv1" in text and "layer4.1.conv2" in text and "global sparsity" in text


def test_inspect_vit_and_state_dict_agree():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    sparsify_constant_fan_in(vit, density=0.25)
    rep = sparse_compile.inspect(vit)
    names = [r.name for r in rep]
    assert "conv_proj" in names and "encoder.layers.encoder_layer_0.mlp.0" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in names
    rep_sd = sparse_compile.inspect(vit.state_dict())
    assert [(r.name, r.fan_in_max, r.ablated) for r in rep_sd] == [(r.name, r.fan_in_max, r.ablated) for r in rep]


def test_inspect_without_mask_counts_zeros():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[:, 4:] = 0
        lin.weight[3] = 0
    (r,) = sparse_compile.inspect(nn.Sequential(lin))
    assert r.fan_in_min == r.fan_in_max == 4 and r.ablated == 1
