"""A small CNN for 28x28 grey images (the Fashion-MNIST recipe): two 5x5 conv layers, two linear."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from . import register_model


class SmallCNN(nn.Sequential):
    """``conv1 5x5 (1->c1, pad 2) -> ReLU -> maxpool 2 -> conv2 5x5 (c1->c2, pad 2) -> ReLU -> maxpool 2
    -> flatten -> fc1 (c2*7*7 -> hidden) -> ReLU -> fc2 (hidden -> classes)``."""

    def __init__(self, channels: tuple = (8, 16), hidden: int = 64, num_classes: int = 10, in_channels: int = 1):
        c1, c2 = channels
        if min(c1, c2, hidden, num_classes, in_channels) < 1:
            raise ValueError(f"SmallCNN widths must be positive: channels={channels}, hidden={hidden}, "
                             f"num_classes={num_classes}, in_channels={in_channels}")
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(in_channels, c1, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, 5, padding=2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(), fc1=nn.Linear(c2 * 7 * 7, hidden), relu3=nn.ReLU(),
            fc2=nn.Linear(hidden, num_classes),
        ))


@register_model("small_cnn", num_classes=10, input_shape=(1, 28, 28))
def small_cnn(num_classes: int = 10, channels: tuple = (8, 16), hidden: int = 64) -> SmallCNN:
    """Small CNN for 28x28 grey images: conv 5x5 x8, pool, conv 5x5 x16, pool, fc 784-64, fc 64-10."""
    return SmallCNN(tuple(channels), hidden, num_classes)
