"""ResNet-18 for 32x32 CIFAR images (Appendix D.1)."""
from __future__ import annotations

import torchvision
from torch import nn

from . import register_model


@register_model("resnet18_cifar", num_classes=10, input_shape=(3, 32, 32))
def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 first conv and no max-pool (Liu 2017; Appendix D.1).

    torchvision's ResNet-18 otherwise: the stem keeps the 32x32 resolution, so the four stages run at
    32, 16, 8 and 4 pixels.
    """
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    model.maxpool = nn.Identity()
    return model
