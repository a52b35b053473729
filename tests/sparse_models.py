"""Test helper shared by the optimize, serialize and backend tests: models sparsified the way a
trained SRigL model is (the conftest puts this folder on sys.path so test files can import it)."""
import torch
from torch import nn

from sparse_compile.train import SRigL


def srigl_init(model, sparsity=0.9, ablate=0.1, seed=0):
    """Our trainer's initialisation at ``sparsity``, then ``ablate`` of each non-head layer's neurons
    ablated (whole mask row off, bias set non-zero so their constant output matters), and BatchNorm
    given non-trivial running statistics; eval mode."""
    torch.manual_seed(seed)
    sp = SRigL(model, None, sparsity=sparsity, total_steps=100)
    sp.remove()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in sp.discovery.targets:
            m, mask = t.module, getattr(t.module, "weight_mask", None)
            if mask is None or t.head or t.param_name != "weight" or mask.shape[0] < 8:
                continue
            rows = torch.randperm(mask.shape[0], generator=g)[: max(1, int(ablate * mask.shape[0]))]
            mask[rows] = False
            m.weight[rows] = 0
            if m.bias is not None:
                m.bias[rows] = torch.randn(len(rows), generator=g) + 0.5
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def random_srigl(model, sparsity=0.9, ablate=0.1, seed=0, min_fan_in=2):
    """Random weights as a trained SRigL model has them, without training: every Linear / Conv2d
    (any subclass, grouped convs per group) gets ``sparse_compile.benchmark.weights.random_layer``'s
    constant fan-in mask at ``sparsity`` with ``ablate`` of its neurons ablated (the last Linear,
    the head, keeps all its neurons), a random bias, and BatchNorm-like layers non-trivial
    statistics; eval mode. Layers whose fan-in is below ``min_fan_in`` stay dense."""
    from sparse_compile.benchmark.weights import random_layer

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            out, fan = m.weight.shape[0], m.weight[0].numel()
            if fan < min_fan_in or out < 2:
                continue
            lw = random_layer(out, fan, sparsity, ablated_fraction=0.0 if m is head else ablate,
                              bias=m.bias is not None, seed=seed * 100003 + i)
            m.weight.copy_(lw.weight.reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.copy_(lw.bias)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()
