"""ImageNet models from torchvision with the paper's changes (Appendix D.2-D.4).

Parameter names are torchvision's, so torchvision checkpoints load into them (``strict=True``).
"""
from __future__ import annotations

import torchvision
from torch import nn

from . import register_model, remove_dropout

_IMAGENET = (3, 224, 224)


@register_model("resnet50", num_classes=1000, input_shape=_IMAGENET)
def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-50, unchanged (Appendix D.2)."""
    return torchvision.models.resnet50(num_classes=num_classes)


@register_model("vit_b_16", num_classes=1000, input_shape=_IMAGENET)
def vit_b_16(num_classes: int = 1000, image_size: int = 224) -> nn.Module:
    """torchvision ViT-B/16 with every dropout removed (Appendix D.3); ``image_size`` a multiple of 16."""
    if image_size % 16 != 0 or image_size < 16:
        raise ValueError(f"vit_b_16: image_size must be a positive multiple of the patch size 16, got {image_size}")
    model = torchvision.models.vit_b_16(num_classes=num_classes, image_size=image_size, dropout=0.0,
                                        attention_dropout=0.0)
    return remove_dropout(model)


@register_model("mobilenet_v3_large", num_classes=1000, input_shape=_IMAGENET)
def mobilenet_v3_large(num_classes: int = 1000) -> nn.Module:
    """torchvision MobileNet-V3 Large without the classifier dropout (Appendix D.4)."""
    return remove_dropout(torchvision.models.mobilenet_v3_large(num_classes=num_classes, dropout=0.0))


@register_model("mobilenet_v3_small", num_classes=1000, input_shape=_IMAGENET)
def mobilenet_v3_small(num_classes: int = 1000) -> nn.Module:
    """torchvision MobileNet-V3 Small without the classifier dropout (Appendix D.4)."""
    return remove_dropout(torchvision.models.mobilenet_v3_small(num_classes=num_classes, dropout=0.0))
