"""The sparse trainers on real architectures: discovery by FX tracing, and a few training steps each."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile import RigL, SRigL
from sparse_compile.train.discovery import discover
from sparse_compile.formats import analyze
from sparse_compile.train.budgets import constant_fan_in


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10)


def build(name):
    import torchvision

    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10), (3, 32, 32)
    if name == "mobilenet_v3_small":
        return torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32)
    if name == "vit_b_16":
        return tiny_vit(), (3, 32, 32)
    if name == "timm_vit":
        import timm

        return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10), (3, 32, 32)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10)), (64,)
    raise KeyError(name)


HEADS = {"resnet18": "fc", "mobilenet_v3_small": "classifier.3", "vit_b_16": "heads.head", "timm_vit": "head",
         "mlp": "5"}


@pytest.mark.parametrize("name", list(HEADS))
def test_model_trains_a_few_steps(name):
    torch.manual_seed(0)
    model, shape = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if "vit" in name else \
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gamma = 0.95 if "vit" in name else 0.3
    # delta_t=1 with total_steps=3: one topology update, at step 1 (t_end = 0.75 * 3 -> step 2).
    sp = SRigL(model, opt, sparsity=0.9, total_steps=3, delta_t=1, gamma_sal=gamma,
               distribution="uniform" if "vit" in name else "erk")
    heads = [t.name for t in sp.discovery.targets if t.head]  # (ERK may leave a small head dense)
    assert heads == [HEADS[name]]
    x = torch.randn(4, *shape)
    y = torch.randint(0, 10, (4,))
    start = {k: m.clone() for k, m in sp.masks.items()}
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for key, m in sp.masks.items():
        info = analyze(params[key], m, key)
        assert info.constant_fan_in, key
        assert (params[key].detach()[~m] == 0).all()
    assert sp.report().updates == 1
    assert any(not torch.equal(start[k], m) for k, m in sp.masks.items())


def test_vit_sparse_and_dense_parts():
    vit = tiny_vit()
    sp = SRigL(vit, None, sparsity=0.9, total_steps=10, distribution="uniform")
    keys = set(sp.masks)
    # Patch projection, MLP layers, attention out-projection (inside the FX leaf MultiheadAttention).
    assert "conv_proj.weight" in keys
    assert "encoder.layers.encoder_layer_0.mlp.0.weight" in keys
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in keys
    # The q/k/v input projection is a raw Parameter: dense, outside the budget, and said so.
    assert not any("in_proj" in k for k in keys)
    rep = sp.report()
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in rep.skipped
    # Uniform: every sparse layer at the same density, up to the integer fan-in.
    for r in rep.layers:
        assert r.fan_in_max == constant_fan_in(0.1, r.fan_in_dense), r.name


def test_vit_qkv_sparse_when_asked():
    vit = tiny_vit()
    sp = RigL(vit, None, sparsity=0.9, total_steps=10, dense_qkv=False)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in sp.masks
    mha = vit.encoder.layers.encoder_layer_0.self_attention
    assert mha.in_proj_weight_mask.shape == mha.in_proj_weight.shape


def test_timm_qkv_dense_by_default():
    model, _ = build("timm_vit")
    sp = SRigL(model, None, sparsity=0.9, total_steps=10)
    assert "blocks.0.attn.proj.weight" in sp.masks and "blocks.0.mlp.fc1.weight" in sp.masks
    assert "blocks.0.attn.qkv.weight" not in sp.masks
    assert "q/k/v" in sp.report().skipped["blocks.0.attn.qkv"]


class Untraceable(nn.Module):
    """Data-dependent control flow: FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)
        self.aux = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            return self.out(h)
        return self.aux(h)


def test_untraceable_model_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="could not trace Untraceable.*output layer.*'aux'"):
        sp = SRigL(Untraceable(), None, sparsity=0.5, total_steps=10)
    assert sorted(sp.masks) == ["aux.weight", "fc1.weight", "out.weight"]
    with pytest.warns(UserWarning, match=r"head=\['out'\] as given"):
        sp = SRigL(Untraceable(), None, sparsity=0.5, total_steps=10, head=["out", "aux"][:1])
    assert [layer.name for layer in sp._layers if layer.target.head] == ["out"]


def test_layer_selection_options():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    d = discover(model, dense_first=True, exclude=["layer4.*"])
    assert d.targets[0].name == "conv1" and d.targets[0].dense
    assert not any(t.name.startswith("layer4.") for t in d.targets)
    assert d.skipped["layer4.0.conv1"].startswith("excluded")
    with pytest.raises(ValueError, match="match no layer"):
        discover(model, exclude=["layer5.*"])
    with pytest.raises(ValueError, match="not a sparse layer"):
        discover(model, head="fcc")
    sp = SRigL(model, None, sparsity=0.9, total_steps=10, dense_first=True)
    assert "conv1.weight" not in sp.masks  # dense, but in the budget:
    rep = sp.report()
    assert rep.layers[0].name == "conv1" and rep.layers[0].dense and rep.layers[0].sparsity == 0
    assert rep.sparsity == pytest.approx(0.9, abs=2e-3)


def test_wrapped_model_names():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compiled = torch.compile(model)
    d = discover(compiled)
    assert [t.param_key for t in d.targets] == ["_orig_mod.0.weight", "_orig_mod.2.weight"]
    assert {t.param_key for t in d.targets} <= set(dict(compiled.named_parameters()))
    assert d.targets[-1].head


class TiedLM(nn.Module):
    """A language-model head whose weight is the embedding: it must stay dense."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        return self.lm_head(torch.relu(self.body(self.emb(idx))))


def test_tied_weights_stay_dense():
    model = TiedLM()
    sp = SRigL(model, None, sparsity=0.5, total_steps=10)
    assert list(sp.masks) == ["body.weight"]
    assert "shared with 'emb.weight'" in sp.report().skipped["lm_head"]
