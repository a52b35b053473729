"""ReLU fused into the condensed conv before it (compiler/fuse.py), through optimize, save and load."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile import load, optimize, save
from sparse_compile.compiler.modules import CondensedConv2d


def _sparse_(conv):
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.8).float())
    return conv


class _Net(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.c1 = _sparse_(nn.Conv2d(3, 16, 3, padding=1))
        self.c2 = _sparse_(nn.Conv2d(16, 16, 3, padding=1))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c1(x)
        if self.form == "module":
            y = self.act(y)
        elif self.form == "function":
            y = F.relu(y)
        elif self.form == "method":
            y = y.relu_()
        elif self.form == "two users":  # the conv's output is read again: not fusable
            y = self.act(y) + y
        elif self.form == "hooked":
            y = self.act(y)
        return self.act(self.c2(y))


def _optimize(net, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize(net, (x,), mode="condensed", pad_condensed=True, min_numel=0)


@pytest.mark.parametrize("form", ["module", "function", "method"])
def test_relu_after_a_condensed_conv_is_fused(form):
    torch.manual_seed(0)
    net, x = _Net(form).eval(), torch.randn(2, 3, 12, 10)
    opt = _optimize(net, x)
    convs = [m for m in opt.modules() if isinstance(m, CondensedConv2d)]
    assert len(convs) == 2 and all(m.activation == "relu" for m in convs)
    assert not any(n.op == "call_method" and n.target in ("relu", "relu_") for n in opt.graph.nodes)
    assert not any(n.op == "call_function" and n.target in (F.relu, torch.relu) for n in opt.graph.nodes)
    assert any("2 ReLU(s) fused" in n for n in opt.sparse_compile_report.notes)
    with torch.no_grad():
        y = opt(x)
        torch.testing.assert_close(y, net(x), rtol=1e-5, atol=1e-5)
    assert (y >= 0).all()


def test_not_fused_where_the_conv_output_is_read_again_or_the_relu_is_hooked():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 10)
    net = _Net("two users").eval()
    opt = _optimize(net, x)
    acts = {name: m.activation for name, m in opt.named_modules() if isinstance(m, CondensedConv2d)}
    assert acts["c1"] == "" and acts["c2"] == "relu"
    with torch.no_grad():
        torch.testing.assert_close(opt(x), net(x), rtol=1e-5, atol=1e-5)
    net = _Net("hooked").eval()
    net.act.register_forward_hook(lambda m, i, o: o * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize(net, (x,), mode="condensed", pad_condensed=True, min_numel=0)
    assert all(m.activation == "" for m in opt.modules() if isinstance(m, CondensedConv2d))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), net(x), rtol=1e-5, atol=1e-5)


def test_fused_activation_survives_save_and_load_and_a_bad_one_is_rejected(tmp_path):
    torch.manual_seed(0)
    net, x = _Net("module").eval(), torch.randn(2, 3, 12, 10)
    opt = _optimize(net, x)
    save(opt, tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors")
    assert [m.activation for m in back.modules() if isinstance(m, CondensedConv2d)] == ["relu", "relu"]
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))
    opt.c1.activation = "os.system"  # a tampered file: an unknown activation names the layer
    save(opt, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="c1.*activation must be one of"):
        load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="activation must be one of"):
        CondensedConv2d(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int16), None, 1, 3, activation="gelu")


def test_autograd_and_compile_paths_apply_the_relu_too():
    # Outside plain eager inference the module computes relu(conv) with torch ops (the fused C++
    # op has no autograd formula); gradients match the original model's.
    torch.manual_seed(0)
    net, x = _Net("module").eval(), torch.randn(2, 3, 12, 10)
    opt = _optimize(net, x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    opt(xa).sum().backward()
    net(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
