"""The trainer must not corrupt state: bad checkpoints are refused before anything changes, inf/NaN
gradients never reach masked weights, a non-finite dense gradient skips the topology update, and a
frozen sparse layer is named."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile import RigL, SRigL, StaticSparse


def mlp():
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 10))


def data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def snapshot(sp):
    return ({k: m.clone() for k, m in sp.masks.items()}, [layer.ever.clone() for layer in sp._layers],
            sp.step_count, sp._updates)


def assert_unchanged(sp, snap):
    masks, evers, step, updates = snap
    assert all(torch.equal(masks[k], m) for k, m in sp.masks.items()), "a mask changed on a failed load"
    assert all(torch.equal(e, layer.ever) for e, layer in zip(evers, sp._layers)), "ever changed on a failed load"
    assert (sp.step_count, sp._updates) == (step, updates)


def _trained(cls, steps=3):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = cls(model, opt, sparsity=0.9, total_steps=20, delta_t=2)
    for x, y in data(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    return sp


def _corrupt(case, state):
    layers = state["layers"]
    if case == "missing_ever_last":
        del layers["4"]["ever"]
    elif case == "all_true_mask":
        layers["0"]["mask"] = torch.ones_like(layers["0"]["mask"])
        layers["0"]["ever"] = torch.ones_like(layers["0"]["ever"])
    elif case == "over_budget_mask":
        m = layers["2"]["mask"].clone()
        m[0] = True  # one neuron with the dense fan-in: over budget and not constant
        layers["2"]["mask"], layers["2"]["ever"] = m, m | layers["2"]["ever"]
    elif case == "ever_shape":
        layers["2"]["ever"] = layers["2"]["ever"][:, :-1]
    elif case == "dense_grad_shape":
        layers["4"]["dense_grad"] = torch.zeros(3, 3)
    elif case == "ever_not_covering_mask":
        layers["0"]["ever"] = torch.zeros_like(layers["0"]["ever"])
    elif case == "step_negative":
        state["step"] = -5
    elif case == "step_huge":
        state["step"] = 10 ** 9
    elif case == "step_float":
        state["step"] = 2.5
    elif case == "updates_over_step":
        state["updates"] = state["step"] + 1
    return state


BAD = {  # case -> what the error must name
    "missing_ever_last": r"layer '4'.*'ever'",
    "all_true_mask": r"layer '0'.*'mask'.*over the layer's budget",
    "over_budget_mask": r"layer '2'.*'mask'",
    "ever_shape": r"layer '2'.*'ever'",
    "dense_grad_shape": r"layer '4'.*'dense_grad'",
    "ever_not_covering_mask": r"layer '0'.*'ever'",
    "step_negative": r"'step'.*-5",
    "step_huge": r"'step'.*1000000000",
    "step_float": r"'step'",
    "updates_over_step": r"'updates'",
}


@pytest.mark.parametrize("cls", [SRigL, RigL])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_is_refused_before_anything_changes(cls, case):
    src = _trained(cls, steps=3)
    state = _corrupt(case, src.state_dict())
    dst = _trained(cls, steps=1)  # different masks and step: a partial load would show
    snap = snapshot(dst)
    with pytest.raises(ValueError, match=BAD[case]):
        dst.load_state_dict(state)
    assert_unchanged(dst, snap)
    dst.load_state_dict(src.state_dict())  # and a good state still loads afterwards
    assert dst.step_count == src.step_count
    assert all(torch.equal(a, b) for a, b in zip(dst.masks.values(), src.masks.values()))


def test_srigl_refuses_a_mask_without_constant_fan_in_and_an_ablated_head():
    src = _trained(SRigL)
    state = src.state_dict()
    m = state["layers"]["2"]["mask"].clone()
    row = torch.nonzero(m[0]).flatten()
    m[0, row[0]] = False  # one weight fewer in one neuron: within budget, fan-in no longer constant
    state["layers"]["2"]["mask"] = m
    dst = _trained(SRigL, steps=1)
    snap = snapshot(dst)
    with pytest.raises(ValueError, match=r"layer '2'.*fan-in"):
        dst.load_state_dict(state)
    state = src.state_dict()
    state["layers"]["4"]["mask"][0] = False  # ablate a neuron of the output layer
    with pytest.raises(ValueError, match=r"layer '4'.*output layer"):
        dst.load_state_dict(state)
    assert_unchanged(dst, snap)


def test_static_refuses_a_changed_mask():
    torch.manual_seed(0)
    a, b = StaticSparse(mlp(), None, sparsity=0.9), StaticSparse(mlp(), None, sparsity=0.9)
    state = a.state_dict()
    state["layers"]["0"]["mask"][0] = False
    snap = snapshot(b)
    with pytest.raises(ValueError, match=r"layer '0'.*'mask'"):
        b.load_state_dict(state)
    assert_unchanged(b, snap)


# ----------------------------------------------------------------------------- non-finite gradients
def _inf_at_pruned(layer_mod):
    """A gradient hook putting +inf at one pruned position of ``layer_mod``'s weight (an overflow).

    Registered before the sparsifier, so its hooks (dense-gradient accumulation, masking) see the inf;
    the position is chosen at the first call, once the mask exists."""
    pos = []

    def hook(g):
        if not pos:
            pos.append(int(torch.nonzero(~layer_mod.weight_mask.view(-1))[0, 0]))
        g = g.clone()
        g.view(-1)[pos[0]] = float("inf")
        return g

    return layer_mod.weight.register_hook(hook), pos


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_inf_gradient_at_a_pruned_position_leaves_the_weight_zero(opt_name):
    torch.manual_seed(0)
    model = mlp()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    h, pos = _inf_at_pruned(model[0])
    sp = SRigL(model, opt, sparsity=0.9, total_steps=100, delta_t=50)  # no update in these steps
    for x, y in data(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    h.remove()
    w = model[0].weight.detach()
    assert w.view(-1)[pos[0]] == 0.0
    assert (w[~model[0].weight_mask] == 0).all()
    assert torch.isfinite(model(data(1)[0][0])).all()


def test_non_finite_dense_gradient_skips_the_update_with_a_warning():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h, _ = _inf_at_pruned(model[2])
    sp = SRigL(model, opt, sparsity=0.9, total_steps=20, delta_t=2)
    before = {k: m.clone() for k, m in sp.masks.items()}
    (x, y), (x2, y2) = data(2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sp.step()
    opt.zero_grad()
    F.cross_entropy(model(x2), y2).backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"skipped the topology update at step 2.*not finite.*'2'"):
        sp.step()
    h.remove()
    assert all(torch.equal(before[k], m) for k, m in sp.masks.items())
    assert sp.report().updates == 0
    assert all(layer.dense_grad is None for layer in sp._layers)
    # The next update, with finite gradients, goes ahead.
    for x, y in data(2, seed=3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    assert sp.report().updates == 1


def test_nan_loss_on_an_update_step_leaves_no_nan_outside_the_masks():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = SRigL(model, opt, sparsity=0.9, total_steps=20, delta_t=2)
    (x, y), (x2, y2) = data(2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sp.step()
    opt.zero_grad()
    (F.cross_entropy(model(x2), y2) * float("nan")).backward()
    opt.step()
    with pytest.warns(UserWarning, match="not finite"):
        sp.step()
    for mod in (model[0], model[2], model[4]):
        assert (mod.weight.detach()[~mod.weight_mask] == 0).all(), "NaN (or any value) outside the mask"
        for v in opt.state[mod.weight].values():
            assert (v[~mod.weight_mask] == 0).all(), "optimizer state outside the mask"


# ------------------------------------------------------------------------------------------ frozen
@pytest.mark.parametrize("cls", [SRigL, RigL, StaticSparse])
def test_frozen_sparse_layer_is_named(cls):
    model = mlp()
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layer '2'.*frozen.*exclude"):
        cls(model, None, sparsity=0.9, total_steps=10)
    assert not any(hasattr(m, "weight_mask") for m in model)  # nothing registered on failure
    SRigL(model, None, sparsity=0.9, total_steps=10, exclude="2")  # the way out the message gives
