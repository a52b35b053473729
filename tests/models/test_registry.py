"""Every registered model: forward shape, FX trace, one SRigL training step, optimize round trip.

Inputs are kept small (32x32 images, ViT-B/16 built for 32x32) so the whole registry runs in
well under a minute on two cores.
"""

import pytest
import torch
import torchvision
from torch import nn

from sparse_compile.formats import analyze, get_mask
from sparse_compile.models import create_model, input_shape, list_models, model_spec
from sparse_compile.fx import trace

SMALL = {"vit_b_16": {"image_size": 32}}  # builder kwargs that keep a test input small


def _small(name):
    kw = SMALL.get(name, {})
    shape = input_shape(name, **kw)
    if len(shape) == 3 and shape[-1] > 32:  # ImageNet models: 32x32 keeps them fast
        shape = (shape[0], 32, 32)
    return kw, shape


BIG = {"vit_b_16", "resnet50"}  # > 10 s each on two cores


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in list_models()])
def built(request):
    """A fresh model (7 classes, small input) and a batch of 2 for it."""
    name = request.param
    kw, shape = _small(name)
    torch.manual_seed(0)
    return name, create_model(name, num_classes=7, **kw), torch.randn(2, *shape)


def test_forward_shape_and_trace(built):
    name, model, x = built
    model.eval()
    with torch.no_grad():
        y = model(x)
        gm = trace(model)
        assert y.shape == (2, 7), name
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()), f"{name} has dropout"


# Topology updates on the big ones cost tens of seconds on two cores (86M / 25M weights): they take
# a masked training step without an update here; the trainer's own tests cover their updates.
NO_UPDATE = BIG


def test_srigl_step_then_optimize(built):
    """One SRigL training step (with a topology update), then ``optimize`` gives the same outputs."""
    from sparse_compile import SRigL

    name, model, x = built
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sp = SRigL(model, opt, sparsity=0.9, total_steps=4, delta_t=100 if name in NO_UPDATE else 1)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    opt.step()
    sp.step()
    opt.zero_grad()
    assert sp.report().updates == (0 if name in NO_UPDATE else 1)
    sparse = [(n, m) for n, m in model.named_modules() if get_mask(m) is not None]
    assert sparse, f"{name}: no layer got a mask"
    for n, m in sparse:
        info = analyze(m.weight, get_mask(m), n)
        assert info.constant_fan_in, f"{name}.{n}: fan-in {info.fan_in_min}..{info.fan_in_max}"
        assert torch.all(m.weight[~get_mask(m)] == 0), f"{name}.{n}: weight outside the mask"
    assert abs(sp.sparsity - 0.9) < 0.01

    from sparse_compile import optimize

    with torch.no_grad():
        # One step on 2 images leaves BatchNorm running statistics far from the activations' (the
        # eval-mode output can overflow); re-estimate them on the batch so eval mode is well defined.
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()(x)
        model.eval()
        ref = model(x)
        assert torch.isfinite(ref).all()
        fast = optimize(model, example_inputs=(x,), mode="ablated_dense")
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # the input model is unchanged


def test_paper_architecture_details():
    r18 = create_model("resnet18_cifar")
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1) and isinstance(r18.maxpool, nn.Identity)
    wrn = create_model("wide_resnet22_cifar")
    convs = [m for m in wrn.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 3 * 3 * 2  # stem + 3 stages x 3 blocks x 2 convs: depth 22 = 19 + 3 shortcuts
    assert [convs[i].out_channels for i in (0, 1, 7, 13)] == [16, 32, 64, 128]  # WRN-22-2
    assert wrn.fc.in_features == 128
    mlp = create_model("mlp")
    assert [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear)] == \
        [(64, 300), (300, 100), (100, 10)]
    assert create_model("mlp", in_features=784, num_classes=3).fc3.out_features == 3


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_torchvision_models_keep_torchvision_parameter_names(name):
    ours = create_model(name).state_dict()
    theirs = getattr(torchvision.models, name)().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_registry_errors_and_metadata():
    assert model_spec("vit_b_16").num_classes == 1000 and input_shape("vit_b_16", image_size=64) == (3, 64, 64)
    assert input_shape("mlp", in_features=784) == (784,)
    with pytest.raises(ValueError, match="resnet18_cifar"):
        create_model("resnet19")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", num_classes=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        create_model("vit_b_16", image_size=30)
