"""BatchNorm2d folded into the conv before it (compiler/fold.py) and what optimize does with it."""
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

from sparse_compile import optimize
from sparse_compile.compiler import whole_model
from sparse_compile.compiler.fold import fold_batchnorms
from sparse_compile.fx import trace


def _bn(c, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
            bn.weight[0] = 0.0  # a channel BatchNorm turns into a constant
    return bn.eval()


class _Pair(nn.Module):
    def __init__(self, bias=True, affine=True, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups)
        with torch.no_grad():
            self.conv.weight.mul_((torch.rand_like(self.conv.weight) > 0.7).float())
        self.bn = _bn(6, affine)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias, affine, groups, dtype", [(True, True, 1, torch.float32), (False, True, 2, torch.float32),
                                                         (True, False, 1, torch.float64), (False, True, 1, torch.bfloat16)])
def test_fold_is_the_same_function_and_keeps_the_zeros(bias, affine, groups, dtype):
    torch.manual_seed(0)
    m = _Pair(bias, affine, groups).eval().to(dtype)
    x = torch.randn(2, 4, 9, 7).to(dtype)
    with torch.no_grad():
        ref = m(x).double()
    zeros = m.conv.weight == 0
    gm = fx.symbolic_trace(m)
    assert fold_batchnorms(gm) == 1
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in gm.modules())
    assert (gm.conv.weight[zeros] == 0).all()
    if affine:  # gamma = 0: an ablated neuron, constant output beta
        assert (gm.conv.weight[0] == 0).all()
    with torch.no_grad():
        y = gm(x).double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert ((y - ref).abs().max() / ref.abs().max()) < tol


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = _bn(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output has another user


class _ReadsWeight(_Pair):
    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.sum()


class _BNSub(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("case", ["shared output", "weight read", "training", "hooked conv", "bn subclass",
                                  "called twice"])
def test_not_folded_where_it_would_change_the_function(case):
    if case == "shared output":
        m = _Shared().eval()
    elif case == "weight read":
        m = _ReadsWeight().eval()
    else:
        m = _Pair().eval()
    if case == "training":
        m.train()
    if case == "hooked conv":
        m.conv.register_forward_hook(lambda mod, i, o: o * 2)
    if case == "bn subclass":
        sub = _BNSub(6).eval()
        sub.load_state_dict(m.bn.state_dict())
        m.bn = sub
    gm = trace(m, leaf_modules=(_BNSub,))  # a leaf, as the plan's tracer makes it (exact.make_leaf)
    if case == "called twice":
        # conv -> bn twice over: the modules are called from two nodes
        x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            c2 = gm.graph.call_module("conv", (x_node,))
            b2 = gm.graph.call_module("bn", (c2,))
            s = gm.graph.call_function(torch.add, (out.args[0], b2))
        out.args = (s,)
        gm.recompile()
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        ref = gm(x)
    assert fold_batchnorms(gm) == 0
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in gm.modules())
    with torch.no_grad():
        assert torch.equal(gm(x), ref)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), _bn(16, seed=1)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), _bn(16, seed=2)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            for c in (self.c1, self.c2):
                c.weight.mul_((torch.rand_like(c.weight) > 0.9).float())

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_optimize_folds_says_so_and_times_a_folded_original(monkeypatch):
    torch.manual_seed(0)
    net, x = _Net().eval(), torch.randn(2, 3, 12, 12)
    seen = []
    real = whole_model.time_models

    def spy(models, *a, **k):
        seen.append({name: sum(isinstance(m, nn.BatchNorm2d) for m in mod.modules()) for name, mod in models.items()})
        return real(models, *a, **k)

    monkeypatch.setattr(whole_model, "time_models", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize(net, (x,), mode="auto", repeats=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in opt.modules())
    assert any("2 BatchNorm2d layer(s) folded" in n for n in opt.sparse_compile_report.notes)
    assert seen and all(v == 0 for counts in seen for v in counts.values())  # the original too
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2  # the user's model untouched
    with torch.no_grad():
        torch.testing.assert_close(opt(x), net(x), rtol=1e-4, atol=1e-5)
