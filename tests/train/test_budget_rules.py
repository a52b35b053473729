"""SRigL's opt-in budget rules (ablate_dead_ends, skip_zero_grad): each rule on a small model, and the
invariants of the paper's rule (constant fan-in, exact budget, head never ablated) under both."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile import SRigL
from sparse_compile.train.budget_rules import Edge, ablate_unfillable
from sparse_compile.formats import analyze


def mlp(widths=(32, 48, 24, 10)):
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class ConvNet(nn.Module):
    """conv -> BN -> ReLU -> max-pool -> flatten -> fc1 -> dropout -> fc2: every edge kind of the rule."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(self.drop(F.relu(self.fc1(torch.flatten(x, 1)))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(x)))) + x)


def batch(shape, seed, zero_features=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, *shape, generator=g)
    if zero_features:
        x[:, :zero_features] = 0  # constant inputs: their weights have exactly zero gradient
    return x, torch.randint(0, 10, (32,), generator=g)


def train(model, sp, opt, steps, shape, zero_features=0, watch=None):
    for i in range(steps):
        x, y = batch(shape, i, zero_features)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if watch is not None and sp.is_update_step(sp.step_count + 1):
            watch(before=True)
        sp.step()
        if watch is not None and sp.is_update_step(sp.step_count):
            watch(before=False)
        opt.zero_grad()


def check_invariants(sp):
    for layer in sp._layers:
        w, m = layer.param.detach(), layer.mask
        info = analyze(w, m, layer.name)
        assert (w[~m] == 0).all(), layer.name
        assert info.constant_fan_in, f"{layer.name}: fan-in {info.fan_in_min}-{info.fan_in_max}"
        assert layer.budget - info.n_active < info.nnz <= layer.budget, (layer.name, info.nnz, layer.budget)
        if layer.target.head:
            assert info.n_active == layer.out, f"head {layer.name} ablated"


def test_defaults_are_the_papers_rule_and_flags_are_checked():
    sp = SRigL(mlp(), None, sparsity=0.9, total_steps=10)
    assert sp.ablate_dead_ends is False and sp.skip_zero_grad is False
    with pytest.raises(ValueError, match="ablate_dead_ends"):
        SRigL(mlp(), None, sparsity=0.9, total_steps=10, ablate_dead_ends="yes")
    with pytest.raises(ValueError, match="skip_zero_grad"):
        SRigL(mlp(), None, sparsity=0.9, total_steps=10, skip_zero_grad=1)


# --------------------------------------------------------------------------------------- dead ends
def test_edges_follow_bn_pool_flatten_dropout_and_skip_residuals():
    torch.manual_seed(0)
    model = ConvNet()
    sp = SRigL(model, None, sparsity=0.9, total_steps=10, ablate_dead_ends=True)
    assert sp._edges == {}  # learnt at the first forward
    bn_mean = model.bn.running_mean.clone()
    model(batch((3, 8, 8), 0)[0])
    assert sp._edges == {"conv": [Edge("fc1", 16)], "fc1": [Edge("fc2", 1)]}
    assert model.training and model.bn.training and model.drop.training  # modes restored
    assert not torch.equal(model.bn.running_mean, bn_mean)  # only the real (training) forward moved them
    assert sp._edge_hook is None

    model = Residual()
    sp = SRigL(model, None, sparsity=0.8, total_steps=10, ablate_dead_ends=True)
    model(torch.randn(4, 16))
    assert set(sp._edges) == {"a"}  # b's output reaches the residual add: never judged


def _make_dead_end(producer, consumer, j, cols=1):
    """Neuron ``j`` of ``producer``: no live outgoing weight in ``consumer`` and a zero output (so the
    consumer has no gradient to regrow it), while it keeps its own live incoming weights."""
    with torch.no_grad():
        m = consumer.weight_mask
        m2 = m.reshape(m.shape[0], -1)
        sl = slice(j * cols, (j + 1) * cols)
        k = int(m2[0].sum())
        for r in range(m2.shape[0]):
            free = torch.nonzero(~m2[r]).flatten()
            free = free[(free < sl.start) | (free >= sl.stop)]
            lost = int(m2[r, sl].sum())
            m2[r, sl] = False
            m2[r, free[:lost]] = True  # keep the constant fan-in
            assert int(m2[r].sum()) == k
        consumer.weight.mul_(m)
        producer.bias[j] = -1e3


@pytest.mark.parametrize("rule", [False, True])
def test_a_neuron_made_dead_end_is_ablated_at_the_next_update(rule):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = SRigL(model, opt, sparsity=0.8, total_steps=100, delta_t=2, ablate_dead_ends=rule)
    x, y = batch((32,), 0)
    model(x)  # first forward: edges learnt
    j = 5
    _make_dead_end(model[0], model[2], j)
    assert model[0].weight_mask[j].any()
    train(model, sp, opt, 2, (32,))
    assert not model[2].weight_mask[:, j].any()  # the consumer did not regrow it (zero gradient)
    # Paper's rule: its weights are large (kept by magnitude), so it stays, with k wasted weights.
    assert model[0].weight_mask[j].any() != rule
    check_invariants(sp)


def test_a_conv_channel_made_dead_end_is_ablated_through_bn_pool_flatten():
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = SRigL(model, opt, sparsity=0.8, total_steps=100, delta_t=2, ablate_dead_ends=True)
    model.eval()
    model(batch((3, 8, 8), 0)[0])
    model.train()
    c = 3
    _make_dead_end(model.conv, model.fc1, c, cols=16)
    with torch.no_grad():  # zero the channel after BN too, so fc1 sees no gradient from it
        model.bn.bias[c] = -1e3
    assert model.conv.weight_mask[c].any()
    train(model, sp, opt, 2, (3, 8, 8))
    assert not model.fc1.weight_mask.reshape(64, 16, 16)[:, c].any()
    assert not model.conv.weight_mask[c].any()
    check_invariants(sp)


def test_no_active_judged_neuron_is_a_dead_end_after_an_update():
    torch.manual_seed(0)
    model = mlp((32, 96, 64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = SRigL(model, opt, sparsity=0.97, total_steps=200, delta_t=4, ablate_dead_ends=True)
    seen = []

    def watch(before):
        if before:
            return
        for p, c in ((model[0], model[2]), (model[2], model[4])):
            active = p.weight_mask.any(dim=1)
            fed = c.weight_mask.any(dim=0)
            # Allowed only for neurons the dense-fan-in safeguard had to keep (none here).
            assert not (active & ~fed).any(), "an active neuron feeds no live weight"
        seen.append(sum(int((~layer.mask.any(dim=1)).sum()) for layer in sp._layers))
        check_invariants(sp)

    train(model, sp, opt, 60, (32,), watch=watch)
    assert seen and max(seen) > 0  # the rule did ablate something at this sparsity


# ------------------------------------------------------------------------------- zero gradients
@pytest.mark.parametrize("rule", [False, True])
def test_no_regrown_weight_has_zero_gradient(rule):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = SRigL(model, opt, sparsity=0.9, total_steps=200, delta_t=3, skip_zero_grad=rule)
    state = {}
    zero_grown = []

    def watch(before):
        if before:
            state["g"] = {layer.name: layer.dense_grad.clone() for layer in sp._layers}
            state["m"] = {layer.name: layer.mask.clone() for layer in sp._layers}
            return
        for layer in sp._layers:
            grown = layer.mask & ~state["m"][layer.name]
            if not layer.target.head:
                zero_grown.append(int((state["g"][layer.name][grown] == 0).sum()))
        check_invariants(sp)

    # 24 of the 32 inputs are always 0: too few non-zero-gradient positions for layer 0's neurons.
    train(model, sp, opt, 30, (32,), zero_features=24, watch=watch)
    assert zero_grown
    if rule:
        assert sum(zero_grown) == 0
        assert sp.report().layers[0].ablated > 0  # neurons that could not fill their fan-in
    else:
        assert sum(zero_grown) > 0  # the paper's rule does regrow them (so the test can fail)


def _pool(caps, fan):
    """keep/ag for neurons whose non-zero-gradient positions number ``caps`` (nothing kept)."""
    keep = torch.zeros(len(caps), fan, dtype=torch.bool)
    ag = torch.zeros(len(caps), fan)
    for i, c in enumerate(caps):
        ag[i, :c] = 1.0
    return keep, ag


def brute_force_best(caps, budget, min_active):
    """The active count that maximises the weights held without zero-gradient regrowth."""
    best, best_n = -1, None
    s = sorted(caps, reverse=True)
    for n in range(max(min_active, 1), len(caps) + 1):
        u = sum(min(c, budget // n) for c in s[:n])
        if u >= best:
            best, best_n = u, n
    return best_n


@pytest.mark.parametrize("caps,budget", [
    ([12, 12, 12, 12, 0, 0], 36),        # two neurons with no gradient at all: ablated, k 6 -> 9
    ([5, 5, 5, 5, 5, 5, 5, 5], 48),     # nobody can fill k=6; ablating would only raise k: keep all
    ([9, 8, 7, 6, 5, 4, 3, 2], 40),     # the runaway case of "ablate until every neuron fills k"
    ([30, 1, 1, 1], 32),
])
def test_ablate_unfillable_keeps_the_count_that_holds_most_useful_weights(caps, budget):
    keep, ag = _pool(caps, 32)
    active = ablate_unfillable(torch.ones(len(caps), dtype=torch.bool), keep, ag, budget, 1)
    n = int(active.sum())
    assert n == brute_force_best(caps, budget, 1)
    # The dropped neurons are the worst-filled ones.
    kept_caps = [c for c, a in zip(caps, active.tolist()) if a]
    dropped = [c for c, a in zip(caps, active.tolist()) if not a]
    assert not dropped or max(dropped) <= min(kept_caps)


def test_ablate_unfillable_does_not_run_away_on_a_small_input_pool():
    # The old rule ("ablate every neuron that cannot fill k, repeat as k grows") took this layer down
    # to a single neuron: each ablation raised k past the next neuron's candidates.
    caps = [10, 10, 9, 9, 8, 8, 7, 7]
    keep, ag = _pool(caps, 16)
    active = ablate_unfillable(torch.ones(8, dtype=torch.bool), keep, ag, 64, 1)
    assert int(active.sum()) >= 6


def test_ablate_unfillable_respects_min_active_and_the_current_active_set():
    keep, ag = _pool([0, 0, 0, 0, 16, 16], 16)
    start = torch.tensor([True, True, True, True, True, False])
    active = ablate_unfillable(start, keep, ag, 48, 3)
    assert int(active.sum()) == 3 and not bool(active[5])  # never re-activates, never below min_active
    assert bool(active[4])


def test_both_rules_keep_the_invariants_on_a_cnn_and_resume_bit_identically():
    def fresh(seed):
        torch.manual_seed(seed)
        model = ConvNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = SRigL(model, opt, sparsity=0.95, total_steps=60, delta_t=3, ablate_dead_ends=True,
                   skip_zero_grad=True)
        return model, opt, sp

    def run(model, opt, sp, steps):
        for i, x, y in steps:
            torch.manual_seed(i)  # dropout draws the same masks in the resumed run
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sp.step()
            opt.zero_grad()
            check_invariants(sp)

    data = [(i, *batch((3, 8, 8), i)) for i in range(24)]
    model, opt, sp = fresh(0)
    run(model, opt, sp, data)
    model_a, opt_a, sp_a = fresh(0)
    run(model_a, opt_a, sp_a, data[:10])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sp": sp_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model_b, opt_b, sp_b = fresh(1)
    model_b.load_state_dict(ck["model"])
    opt_b.load_state_dict(ck["opt"])
    sp_b.load_state_dict(ck["sp"])
    run(model_b, opt_b, sp_b, data[10:])
    for (k, v), (_, v2) in zip(model.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(v, v2), f"{k} differs after resume"
    assert sp.report().updates >= 6
