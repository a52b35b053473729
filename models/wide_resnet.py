"""Wide ResNet-22-2 for CIFAR (Zagoruyko & Komodakis 2016; Appendix C of the paper).

The paper cites WRN-22 without giving the width; RigL (Evci et al. 2020) and SRigL's reference
implementation train WRN-22-2 on CIFAR-10 (widths 32, 64, 128 after a 16-channel stem), which is the
default here. Pre-activation basic blocks; the reference's dropout (0.3) is off by default, as for
every model of this zoo (dropout can zero all live inputs of a sparse neuron).
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_model


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with an identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(pre)))))
        # With a projection the shortcut reads the pre-activated input, as in the original WRN code.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: a 3x3 stem, three stages of ``(depth-4)/6`` blocks, BN-ReLU, pool, fc."""

    def __init__(self, depth: int = 22, widen_factor: int = 2, num_classes: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Wide ResNet depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        for s, stride in enumerate((1, 2, 2)):
            blocks = [WideBasicBlock(widths[s] if i == 0 else widths[s + 1], widths[s + 1],
                                     stride if i == 0 else 1, drop_rate) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


@register_model("wide_resnet22_cifar", num_classes=10, input_shape=(3, 32, 32))
def wide_resnet22_cifar(num_classes: int = 10, widen_factor: int = 2, drop_rate: float = 0.0) -> WideResNet:
    """Wide ResNet-22-2 for CIFAR (widths 32/64/128; ``widen_factor`` changes the 2)."""
    return WideResNet(depth=22, widen_factor=widen_factor, num_classes=num_classes, drop_rate=drop_rate)
