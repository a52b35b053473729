"""SRigL / RigL / StaticSparse: the invariants of the issue, each a test (small models, CPU)."""
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_compile
from sparse_compile import RigL, SRigL, StaticSparse
from sparse_compile.formats import analyze, get_mask
from sparse_compile.train.budgets import achieved_sparsity, layer_densities


class ConvNet(nn.Module):
    """A conv (with a kernel: the [out, in*kh*kw] view matters) and two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def mlp(widths=(64, 300, 100, 10)):
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batches(n, shape, seed=1, classes=10, batch=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
}


def check_layer(name, weight, mask, budget, constant=True):
    """The per-step invariants of one layer."""
    info = analyze(weight, mask, name)
    assert (weight.detach()[~mask] == 0).all(), f"{name}: weight outside the mask"
    if constant:
        assert info.constant_fan_in, f"{name}: fan-in {info.fan_in_min}-{info.fan_in_max}"
        assert info.fan_in_max <= info.fan_in_dense
        # Budget up to the integer rounding of the fan-in (less than one weight per active neuron).
        assert budget - info.n_active < info.nnz <= budget, (name, info.nnz, budget, info.n_active)
    else:
        assert info.nnz == budget
    return info


# ------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_srigl_invariants_after_every_step(opt_name):
    torch.manual_seed(0)
    model = ConvNet()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sp = SRigL(model, opt, sparsity=0.9, total_steps=40, delta_t=3, gamma_sal=0.3)
    budgets = {layer.target.param_key: layer.budget for layer in sp._layers}
    params = dict(model.named_parameters())
    start = {k: m.clone() for k, m in sp.masks.items()}
    for x, y in batches(18, (3, 8, 8)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        # Masked weights stay exactly 0 through the optimizer step itself (gradients are masked and
        # the optimizer state of masked weights is 0), not only after the sparsifier re-masks.
        for key, m in sp.masks.items():
            assert (params[key].detach()[~m] == 0).all(), f"{opt_name} moved a masked weight of {key}"
        sp.step()
        opt.zero_grad()
        for key, m in sp.masks.items():
            check_layer(key, params[key], m, budgets[key])
    assert sp.report().updates == 6
    assert any(not torch.equal(start[k], m) for k, m in sp.masks.items()), "no topology change happened"


def test_rigl_keeps_exact_budget_and_static_never_changes():
    torch.manual_seed(0)
    model = ConvNet()
    opt = OPTIMIZERS["sgd"](model.parameters())
    sp = RigL(model, opt, sparsity=0.9, total_steps=40, delta_t=3)
    params = dict(model.named_parameters())
    start = {k: m.clone() for k, m in sp.masks.items()}
    for x, y in batches(12, (3, 8, 8)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
        for layer in sp._layers:
            check_layer(layer.name, layer.param, layer.mask, layer.budget, constant=False)
    assert any(not torch.equal(start[k], m) for k, m in sp.masks.items())
    assert any(not analyze(params[k], m).constant_fan_in for k, m in sp.masks.items())

    model = ConvNet()
    opt = OPTIMIZERS["sgd"](model.parameters())
    st = StaticSparse(model, opt, sparsity=0.9)
    start = {k: m.clone() for k, m in st.masks.items()}
    params = dict(model.named_parameters())
    for x, y in batches(5, (3, 8, 8)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        st.step()
        opt.zero_grad()
    for k, m in st.masks.items():
        assert torch.equal(start[k], m)
        assert analyze(params[k], m).constant_fan_in
        assert (params[k].detach()[~m] == 0).all()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizer_state_is_zeroed_for_pruned_and_grown_weights(opt_name):
    torch.manual_seed(0)
    model = mlp((32, 64, 10))
    opt = OPTIMIZERS[opt_name](model.parameters())
    sp = SRigL(model, opt, sparsity=0.8, total_steps=100, delta_t=4, alpha=0.5)
    data = batches(4, (32,))
    for i, (x, y) in enumerate(data):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i == 3:  # the update step: snapshot just before it
            layer = sp._layers[0]
            p = layer.param
            old = layer.mask.clone()
            w_before = p.detach().clone()
            state_before = {k: v.clone() for k, v in opt.state[p].items()
                            if isinstance(v, torch.Tensor) and v.shape == p.shape}
        sp.step()
        opt.zero_grad()
    new = layer.mask
    survive, pruned, grown = old & new, old & ~new, new & ~old
    assert pruned.any() and grown.any()
    assert state_before and all(v[old].abs().sum() > 0 for v in state_before.values())
    for k, v in opt.state[p].items():
        if k in state_before:
            assert (v[pruned] == 0).all() and (v[grown] == 0).all(), f"{k} not reset"
            assert torch.equal(v[survive], state_before[k][survive]), f"{k} of kept weights changed"
    assert (p.detach()[grown] == 0).all(), "grown weights must start at 0"
    assert (p.detach()[pruned] == 0).all()
    assert torch.equal(p.detach()[survive], w_before[survive])


# --------------------------------------------------------------------------------- distribution
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_trainer_meets_the_global_sparsity_exactly_as_reported(distribution):
    torch.manual_seed(0)
    model = ConvNet()
    sp = SRigL(model, None, sparsity=0.9, total_steps=10, distribution=distribution)
    shapes = {"conv": (16, 3, 3, 3), "fc1": (64, 256), "fc2": (10, 64)}
    dens = layer_densities(shapes, 0.9, distribution)
    rep = sp.report()
    live = sum(int(m.sum()) for m in sp.masks.values())
    total = sum(math.prod(s) for s in shapes.values())
    assert rep.sparsity == 1 - live / total == achieved_sparsity(shapes, dens)
    assert abs(rep.sparsity - 0.9) <= sum(s[0] for s in shapes.values()) / 2 / total
    by = {r.name: r for r in rep.layers}
    if distribution == "uniform":
        for n, s in shapes.items():
            assert by[n].fan_in_max == round(0.1 * math.prod(s[1:]))
    else:
        assert by["fc2"].sparsity < by["fc1"].sparsity  # ERK: small layers denser


def test_trainer_sparse_init_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))
    sp = SRigL(model, None, sparsity=0.95, total_steps=10, distribution="uniform")
    w, m = model[0].weight.detach(), model[0].weight_mask
    k = int(m[0].sum())
    assert k == 50
    assert w[m].std().item() == pytest.approx(math.sqrt(2 / k), rel=0.02)
    w0 = model[0].weight.detach().clone()
    model2 = nn.Sequential(nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))
    w_orig = model2[0].weight.detach().clone()
    SRigL(model2, None, sparsity=0.95, total_steps=10, distribution="uniform", init=False)
    m2 = model2[0].weight_mask
    assert torch.equal(model2[0].weight.detach()[m2], w_orig[m2])  # init=False only masks
    assert not torch.equal(w0, model2[0].weight.detach())
    del sp


# ---------------------------------------------------------------------------------- dense grads
def test_dense_gradient_is_averaged_over_grad_accumulation_steps():
    torch.manual_seed(0)
    model = mlp((16, 32, 10))
    twin = mlp((16, 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = SRigL(model, opt, sparsity=0.7, total_steps=100, delta_t=5, grad_accumulation=3)
    keys = list(sp.masks)
    expected = {k: torch.zeros_like(dict(model.named_parameters())[k]) for k in keys}
    for step, (x, y) in enumerate(batches(5, (16,)), start=1):
        # The dense gradient of this step, from a hook-free twin holding the same weights.
        twin.load_state_dict(model.state_dict(), strict=False)
        twin.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        if step >= 3:
            for k in keys:
                expected[k] += dict(twin.named_parameters())[k].grad / 3
        F.cross_entropy(model(x), y).backward()
        # The optimizer sees the masked gradient ...
        for k in keys:
            g = dict(model.named_parameters())[k].grad
            assert (g[~sp.masks[k]] == 0).all()
        opt.step()
        if step == 5:
            # ... while the sparsifier summed the dense ones of steps 3, 4, 5 only.
            for layer in sp._layers:
                assert torch.allclose(layer.dense_grad / 3, expected[layer.target.param_key], atol=1e-6)
        elif step < 3:
            assert all(layer.dense_grad is None for layer in sp._layers)
        sp.step()
        opt.zero_grad()
    assert all(layer.dense_grad is None for layer in sp._layers)  # freed after the update
    assert sp.report().updates == 1


# ------------------------------------------------------------------------------------- ablation
def _train_99(gamma_sal, steps=80):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = SRigL(model, opt, sparsity=0.99, total_steps=steps, delta_t=10, gamma_sal=gamma_sal)
    k0 = {r.name: r.fan_in_max for r in sp.report().layers}
    for x, y in batches(steps, (64,), batch=32):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    return sp, k0


def test_ablation_at_99_percent():
    sp, k0 = _train_99(0.3)
    rep = sp.report()
    by = {r.name: r for r in rep.layers}
    ablated = [r for r in rep.layers if r.ablated]
    assert ablated, "no neuron was ablated at 99% sparsity"
    for r in rep.layers:
        # The budget of the ablated neurons goes to the others: k = floor(budget / active).
        assert r.fan_in_min == r.fan_in_max == r.budget // r.active <= r.fan_in_dense
    assert any(r.fan_in_max > k0[r.name] for r in ablated), "no fan-in grew after ablation"
    head = by["4"]
    assert head.head and head.ablated == 0
    assert rep.history[-1]["ablated"] == rep.ablated > 0


def test_no_ablation_with_gamma_sal_zero():
    sp, k0 = _train_99(0.0)
    for r in sp.report().layers:
        assert r.ablated == 0
        assert r.fan_in_max == r.fan_in_min == k0[r.name]


def test_head_named_by_the_user_is_never_ablated():
    torch.manual_seed(0)
    model = mlp((64, 300, 100, 10))
    sp = SRigL(model, None, sparsity=0.99, total_steps=100, head="2")
    assert [layer.target.head for layer in sp._layers] == [False, True, False]


# ---------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("cls", [SRigL, RigL])
def test_resume_is_bit_identical(cls):
    n, m = 8, 9  # stops inside a gradient-accumulation window (update at 9 averages steps 8, 9)
    data = batches(n + m, (3, 8, 8))

    def fresh(seed):
        torch.manual_seed(seed)
        model = ConvNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sp = cls(model, opt, sparsity=0.9, total_steps=40, delta_t=3, grad_accumulation=2)
        return model, opt, sp

    def run(model, opt, sp, chunk):
        for x, y in chunk:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sp.step()
            opt.zero_grad()

    model, opt, sp = fresh(0)
    run(model, opt, sp, data)

    model_a, opt_a, sp_a = fresh(0)
    run(model_a, opt_a, sp_a, data[:n])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sp": sp_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model_b, opt_b, sp_b = fresh(123)  # different init and masks, overwritten by the checkpoint
    model_b.load_state_dict(ck["model"])
    opt_b.load_state_dict(ck["opt"])
    sp_b.load_state_dict(ck["sp"])
    run(model_b, opt_b, sp_b, data[n:])

    for (k, v), (k2, v2) in zip(model.state_dict().items(), model_b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), f"{k} differs after resume"
    assert sp.report().to_dict() == sp_b.report().to_dict()
    assert sp.report().updates >= 3


def test_masks_live_in_the_model_state_dict_and_inspect_reads_them():
    torch.manual_seed(0)
    model = ConvNet()
    sp = SRigL(model, None, sparsity=0.9, total_steps=10)
    sd = model.state_dict()
    assert {"conv.weight_mask", "fc1.weight_mask", "fc2.weight_mask"} <= set(sd)
    assert sd["fc1.weight_mask"].dtype == torch.bool
    for name, mod in model.named_children():
        assert get_mask(mod) is sp.masks[f"{name}.weight"] or torch.equal(get_mask(mod), sp.masks[f"{name}.weight"])
    rep = sparse_compile.inspect(model)
    assert all(r.constant_fan_in for r in rep)
    assert rep.sparsity == pytest.approx(sp.sparsity)


def test_masks_follow_the_model_across_to():
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = SRigL(model, opt, sparsity=0.9, total_steps=10, delta_t=2)
    model.to(torch.float64)
    x, y = batches(1, (3, 8, 8))[0]
    for _ in range(2):
        F.cross_entropy(model(x.double()), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    assert sp.masks["fc1.weight"] is model.fc1.weight_mask
    assert (model.fc1.weight.detach()[~model.fc1.weight_mask] == 0).all()


def test_load_state_dict_rejects_mismatches_without_changing_anything():
    torch.manual_seed(0)
    a = SRigL(ConvNet(), None, sparsity=0.9, total_steps=10)
    b_model = ConvNet()
    b = SRigL(b_model, None, sparsity=0.8, total_steps=10)
    before = {k: m.clone() for k, m in b.masks.items()}
    with pytest.raises(ValueError, match="budget"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="RigL"):
        b.load_state_dict(RigL(ConvNet(), None, sparsity=0.8, total_steps=10).state_dict())
    bad = b.state_dict()
    del bad["layers"]["fc1"]
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict(bad)
    assert all(torch.equal(before[k], m) for k, m in b.masks.items())
    assert b.step_count == 0


# ---------------------------------------------------------------------------------------- report
def test_report_table_json_and_history(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = SRigL(model, opt, sparsity=0.9, total_steps=20, delta_t=2)
    for x, y in batches(6, (3, 8, 8)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    rep = sp.report()
    text = str(rep)
    for name in ("conv", "fc1", "fc2 (head)", "ITOP"):
        assert name in text
    assert [h["step"] for h in rep.history] == [0, 2, 4, 6]
    assert all(set(h) >= {"step", "itop", "layers"} for h in rep.history)
    itops = [h["itop"] for h in rep.history]
    assert itops == sorted(itops) and itops[-1] > itops[0]  # ITOP only grows, and it grew
    assert itops[0] == pytest.approx(1 - rep.history[0]["sparsity"])  # at start: ever-live == live
    assert set(rep.history[-1]["layers"]) == {"conv", "fc1", "fc2"}
    assert any(r.drop_fraction > 0 for r in rep.layers)
    path = tmp_path / "report.json"
    rep.to_json(path)
    loaded = json.loads(path.read_text())
    assert loaded["history"] == rep.to_dict()["history"]
    assert loaded["layers"][0]["fan_in"] == rep.layers[0].fan_in


# -------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw, match", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(delta_t=0), "delta_t"),
    (dict(alpha=0.0), "alpha"),
    (dict(t_end=1.5), "t_end"),
    (dict(grad_accumulation=200), "grad_accumulation"),
    (dict(distribution="er"), "distribution"),
    (dict(gamma_sal=-0.1), "gamma_sal"),
    (dict(total_steps=None), "total_steps"),
])
def test_bad_arguments_are_named(kw, match):
    args = dict(sparsity=0.9, total_steps=10) | kw
    model = ConvNet()
    with pytest.raises(ValueError, match=match):
        SRigL(model, None, **args)
    assert not hasattr(model.fc1, "weight_mask")  # nothing registered on failure


def test_second_sparsifier_on_the_same_model_is_refused():
    model = ConvNet()
    SRigL(model, None, sparsity=0.9, total_steps=10)
    with pytest.raises(ValueError, match="already has"):
        RigL(model, None, sparsity=0.9, total_steps=10)


def test_updates_stop_at_t_end():
    torch.manual_seed(0)
    model = mlp((16, 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = SRigL(model, opt, sparsity=0.8, total_steps=20, delta_t=2, t_end=0.5)
    assert [s for s in range(1, 21) if sp.is_update_step(s)] == [2, 4, 6, 8]
    assert sp.drop_fraction(0) == pytest.approx(0.3) and sp.drop_fraction(10) == pytest.approx(0.0)
    assert sp.drop_fraction(5) == pytest.approx(0.15)


@pytest.mark.parametrize("cls", ["RigL", "StaticSparse", "SRigL"])
def test_every_method_takes_srigls_arguments(cls):
    """The README's promise: the three are swapped for one another by name, SRigL's arguments included."""
    import inspect as pyinspect

    import sparse_compile

    C = getattr(sparse_compile, cls)
    def shared(c):  # SRigL's keyword-only options beyond the paper (ablate_dead_ends, ...) are its own
        return [n for n, p in pyinspect.signature(c).parameters.items() if p.kind != p.KEYWORD_ONLY]

    assert shared(C) == shared(sparse_compile.SRigL) and "gamma_sal" in shared(C)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sp = C(model, None, 0.8, 50, 10, 0.3, 0.75, 0.5, "uniform", 1)  # positionally, in SRigL's order
    assert sp.gamma_sal == 0.5 and sp.distribution == "uniform" and sp.delta_t == 10
    with pytest.raises(ValueError, match="gamma_sal"):
        C(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), None, 0.8, 50, gamma_sal=1.5)


def _order_run(wrong: bool, steps: int = 30):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = SRigL(model, opt, sparsity=0.9, total_steps=steps, delta_t=5)
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    outside = 0  # the most weights outside their masks after any iteration
    for _ in range(steps):
        F.cross_entropy(model(torch.randn(16, 32, generator=g)), torch.randint(0, 5, (16,), generator=g)).backward()
        if wrong:
            sp.step()
            opt.step()
        else:
            opt.step()
            sp.step()
        opt.zero_grad()
        outside = max(outside, sum(int((params[k].detach()[~m] != 0).sum()) for k, m in sp.masks.items()))
    return sp, outside


def test_step_before_optimizer_step_is_detected_and_made_harmless():
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")  # the right order warns about nothing
        sp, outside = _order_run(wrong=False)
    assert sp.report().updates > 0 and outside == 0
    with pytest.warns(UserWarning, match=r"SRigL.step\(\) was called without an optimizer.step\(\) before it \(at step 1\)") as rec:
        sp, outside = _order_run(wrong=True)
    assert len([r for r in rec if "optimizer.step()" in str(r.message)]) == 1  # said once, at the first step
    assert sp.report().updates > 0 and outside == 0  # every weight still inside its mask
