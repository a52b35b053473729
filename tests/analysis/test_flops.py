"""Multiply-add counts (Appendix G) against hand counts, and the training-cost formula."""
import json

import pytest
import torch
from torch import nn

from sparse_compile.analysis.flops import FlopReport, flops, training_flops


def set_mask(layer: nn.Module, fan_ins) -> None:
    """Give ``layer`` a ``weight_mask`` whose row i has ``fan_ins[i]`` live weights (0 = ablated),
    scattered over the row so that no count can come out right by accident of position."""
    out = layer.weight.shape[0]
    fan = layer.weight[0].numel()
    assert len(fan_ins) == out
    g = torch.Generator().manual_seed(out * 31 + fan)
    m = torch.zeros(out, fan, dtype=torch.bool)
    for i, k in enumerate(fan_ins):
        m[i, torch.randperm(fan, generator=g)[:k]] = True
    layer.register_buffer("weight_mask", m.reshape(layer.weight.shape))


def by_name(rep: FlopReport) -> dict:
    return {r.name: r for r in rep}


def test_mlp_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    set_mask(model[0], [3, 0, 3, 3, 0, 3, 3, 3])  # k = 3, rows 1 and 4 ablated: 6 active
    set_mask(model[2], [2, 2, 0, 2, 2, 2])  # k = 2, 5 active
    set_mask(model[4], [1, 2, 3, 1])  # fan-in not constant: condensed pads every row to 3
    rep = flops(model, (3, 10))  # 3 positions (the batch) for every layer
    assert [r.positions for r in rep] == [3, 3, 3]
    assert rep.dense == 3 * (8 * 10 + 6 * 8 + 4 * 6)  # 456
    assert rep.masked == 3 * (6 * 3 + 5 * 2 + (1 + 2 + 3 + 1))  # 105
    assert rep.condensed == 3 * (6 * 3 + 5 * 2 + 4 * 3)  # 120
    # ablated-dense: layer 0 sees the full input (10), layer 2 the 6 active outputs of layer 0
    # (through the ReLU), layer 4 the 5 active outputs of layer 2.
    assert rep.ablated_dense == 3 * (6 * 10 + 5 * 6 + 4 * 5)  # 330
    r = by_name(rep)
    assert (r["0"].inputs, r["2"].inputs, r["4"].inputs) == ("full", "upstream", "upstream")
    assert (r["2"].active_inputs, r["4"].active_inputs) == (6, 5)
    assert r["0"].constant_fan_in and not r["4"].constant_fan_in and r["4"].k == 3
    d = rep.to_dict()
    assert d["masked"] == 105 and d["ratio"]["masked"] == pytest.approx(105 / 456)
    assert json.loads(rep.to_json())["layers"][1]["n_active"] == 5


class SmallConvNet(nn.Module):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pool = pool
        self.fc = nn.Linear(6 if pool else 6 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        if self.pool:
            x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("pool", [True, False])
def test_conv_net_hand_count(pool):
    torch.manual_seed(0)
    model = SmallConvNet(pool)
    set_mask(model.conv1, [5, 0, 5, 5])  # k = 5 of 27, 3 active channels
    set_mask(model.conv2, [7, 7, 0, 7, 0, 7])  # k = 7 of 36, 4 active channels
    set_mask(model.fc, [2] * 5)
    rep = flops(model, (2, 3, 8, 8))
    # conv1: 8x8 out, P = 2*64; max-pool to 4x4; conv2 (stride 2, pad 1): 2x2 out, P = 2*4; fc: P = 2.
    fc_in = 6 if pool else 24
    assert [r.positions for r in rep] == [128, 8, 2]
    assert rep.dense == 128 * 4 * 27 + 8 * 6 * 36 + 2 * 5 * fc_in
    assert rep.masked == 128 * 3 * 5 + 8 * 4 * 7 + 2 * 5 * 2
    assert rep.condensed == rep.masked  # constant fan-in everywhere
    # conv2 keeps 3 of 4 input channels x 9 taps; fc keeps the 4 active channels of conv2 (times the
    # 2x2 pixels each channel flattens into when there is no pooling).
    fc_active_in = 4 if pool else 4 * 4
    assert rep.ablated_dense == 128 * 3 * 27 + 8 * 4 * 27 + 2 * 5 * fc_active_in
    assert [r.inputs for r in rep] == ["full", "upstream", "upstream"]


def test_flops_restores_mode_and_leaves_no_hooks():
    model = SmallConvNet()
    model.train()
    stats = model.bn1.running_mean.clone()
    flops(model, (2, 3, 8, 8))
    assert model.training and model.bn1.training
    assert torch.equal(model.bn1.running_mean, stats)
    assert not any(m._forward_hooks for m in model.modules())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(y)  # an addition: ablated channels of b cannot be removed downstream
        return self.g(y)


def test_inputs_are_full_where_removal_is_not_exact():
    m = Residual()
    set_mask(m.a, [1, 0, 1, 1])
    set_mask(m.b, [1, 1, 0, 1])
    rep = by_name(flops(m, (1, 4, 5, 5)))
    assert (rep["b"].inputs, rep["b"].active_inputs) == ("upstream", 3)
    assert (rep["g"].inputs, rep["g"].active_inputs) == ("full", 2 * 9)


def test_a_module_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return self.l(torch.relu(self.l(x)))

    rep = flops(Twice(), (3, 4))
    assert rep[0].positions == 6 and rep.dense == 6 * 16


def test_linear_over_tokens_and_untraceable_models():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
                return self.l(x) * 2
            return self.l(x)

    rep = flops(Tokens(), (2, 5, 8))
    assert rep[0].positions == 10 and rep.dense == 10 * 3 * 8
    assert rep.trace_error and "full input width" in str(rep)
    assert rep[0].inputs == "full"


def test_multihead_attention_projections_are_counted():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.register_buffer("memory", torch.randn(2, 7, 8))

        def forward(self, x):
            return self.attn(x, self.memory, self.memory, need_weights=False)[0]

    m = Cross()
    set_mask(m.attn.out_proj, [3] * 8)
    rep = by_name(flops(m, (2, 3, 8)))
    # q projection on 2*3 query tokens, k and v projections on 2*7 memory tokens; the out-projection
    # (read by torch without calling the module) on the 6 query tokens.
    assert rep["attn.in_proj_weight"].dense == 8 * 8 * 6 + 16 * 8 * 14
    assert rep["attn.out_proj"].positions == 6
    assert rep["attn.out_proj"].dense == 6 * 64 and rep["attn.out_proj"].masked == 6 * 8 * 3


def test_layer_without_mask_counts_nonzeros():
    lin = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(24.0).reshape(4, 6) % 3)  # a third of the weights are 0
    rep = flops(lin, (1, 6))
    assert rep.masked == 16 and rep.dense == 24 and rep[0].constant_fan_in and rep[0].k == 4


def test_training_flops_hand_count():
    # Updates at steps 100, ..., 700 (< 0.75 * 1000): 7 updates, one dense-gradient batch each.
    t = training_flops(10, 100, total_steps=1000, delta_t=100, grad_accumulation=1, t_end=0.75)
    assert t.n_updates == 7
    assert t.sparse == 3 * 10 * 1000 + 7 * (100 - 10)
    assert t.dense == 3 * 100 * 1000
    assert t.ratio == pytest.approx(30630 / 300000)
    t4 = training_flops(10, 100, total_steps=1000, delta_t=100, grad_accumulation=4, t_end=0.75)
    assert t4.sparse == 30000 + 7 * 4 * 90
    # The topology is frozen at t_end * T itself: 600 is not an update step.
    assert training_flops(10, 100, total_steps=800, delta_t=100, t_end=0.75).n_updates == 5
    assert training_flops(10, 100, total_steps=800, delta_t=100, t_end=0.0).n_updates == 0
    dense = training_flops(100, 100, total_steps=50, delta_t=10)
    assert dense.ratio == pytest.approx(1.0)
    assert t.to_dict()["ratio"] == pytest.approx(t.ratio)


@pytest.mark.parametrize(
    "kw,match",
    [(dict(total_steps=0), "total_steps"), (dict(total_steps=10, delta_t=5, grad_accumulation=6), "cannot exceed"),
     (dict(total_steps=10, t_end=1.5), "t_end"), (dict(total_steps=10, delta_t=2.5), "delta_t")],
)
def test_training_flops_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        training_flops(1, 2, **kw)
    with pytest.raises(ValueError, match="sparse_forward"):
        training_flops(3, 2, total_steps=10)


def test_flops_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        flops("resnet", (1, 3))
    with pytest.raises(ValueError, match="input_shape"):
        flops(nn.Linear(2, 2), (0, 2))


def test_lazy_export():
    import sparse_compile

    assert sparse_compile.flops is flops


def test_cli_masked_ratio_is_the_achieved_density(tmp_path):
    # For an MLP every layer runs at the same number of positions (the batch), so the masked ratio
    # must equal 1 - the achieved global sparsity of the masks exactly.
    from sparse_compile.cli import main

    out = tmp_path / "f.json"
    assert main(["flops", "--model", "mlp", "--sparsity", "0.9", "0.5", "--batch-size", "4",
                 "--total-steps", "1000", "--delta-t", "100", "--grad-accumulation", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["sparsity"] for r in rows] == [0.9, 0.5]
    for r in rows:
        f = r["flops"]
        assert f["masked"] / f["dense"] == pytest.approx(1 - r["achieved_sparsity"], abs=1e-12)
        assert abs(r["achieved_sparsity"] - r["sparsity"]) < 0.01
        tr = training_flops(f["masked"], f["dense"], total_steps=1000, delta_t=100, grad_accumulation=2)
        assert r["training"]["ratio"] == pytest.approx(tr.ratio)
        assert f["condensed"] == f["masked"]  # random constant fan-in masks, nothing ablated


def test_cli_reads_masks_from_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from sparse_compile.cli import main
    from sparse_compile.models import create_model

    model = create_model("mlp")
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for lin in lins:
        set_mask(lin, [2] * lin.out_features)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "f.json"
    assert main(["flops", "--model", "mlp", "--checkpoint", str(tmp_path / "m.safetensors"), "--json", str(out)]) == 0
    f = json.loads(out.read_text())["rows"][0]["flops"]
    assert f["masked"] == sum(2 * lin.out_features for lin in lins)


def test_a_shared_module_with_different_producers_counts_full_inputs():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 2)

        def forward(self, x):
            return self.c(self.a(x)) + self.c(self.b(x))

    m = Shared()
    set_mask(m.a, [1, 0, 1, 1])
    set_mask(m.b, [1, 1, 1, 1])
    rep = by_name(flops(m, (1, 4)))
    assert (rep["c"].inputs, rep["c"].active_inputs) == ("full", 4)
    assert rep["c"].positions == 2
