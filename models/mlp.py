"""LeNet-300-100 style multi-layer perceptron (the digits demo model)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from . import register_model


class MLP(nn.Sequential):
    """Flatten, then ``Linear -> ReLU`` per hidden width, then a Linear classifier.

    Layers are named ``fc1 .. fcN`` (state-dict keys ``fc1.weight``...), the classifier is the last.
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (300, 100), num_classes: int = 10):
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"MLP widths must be positive: in={in_features}, hidden={tuple(hidden)}, out={num_classes}")
        layers: "OrderedDict[str, nn.Module]" = OrderedDict(flatten=nn.Flatten())
        widths = [in_features, *hidden]
        for i in range(len(hidden)):
            layers[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
            layers[f"relu{i + 1}"] = nn.ReLU()
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(widths[-1], num_classes)
        super().__init__(layers)
        self.in_features = in_features


@register_model("mlp", num_classes=10, input_shape=(64,))
def mlp(num_classes: int = 10, in_features: int = 64, hidden: Sequence[int] = (300, 100)) -> MLP:
    """LeNet-300-100 style MLP; defaults to the 8x8 digits (64 inputs): 64-300-100-10."""
    return MLP(in_features=in_features, hidden=tuple(hidden), num_classes=num_classes)


@register_model("lenet300_100", num_classes=10, input_shape=(1, 28, 28))
def lenet300_100(num_classes: int = 10) -> MLP:
    """LeNet-300-100 on 28x28 images (MNIST): 784-300-100-10, the standard sparse-training MLP."""
    return MLP(in_features=784, hidden=(300, 100), num_classes=num_classes)
