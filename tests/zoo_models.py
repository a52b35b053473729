"""A broad zoo of small timm architectures for the optimize zoo test (tests/compiler/test_zoo.py).

Every entry is a tiny configuration of a real architecture (timm's ``test_*`` models where they
exist, else few blocks / channels via the model's own arguments, small images), so that the whole
zoo is rewritten three times in a few minutes on two cores. Run this file to print the coverage
table of the README (mode "condensed")::

    .venv/bin/python tests/zoo_models.py
"""
from __future__ import annotations

from functools import partial

import torch


def _timm(name, **kw):
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _mixer(kind):
    def build():
        from timm.models import mlp_mixer as mm
        from timm.layers import GatedMlp, Mlp

        kw = dict(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64)
        if kind == "resmlp":
            return mm.MlpMixer(block_layer=partial(mm.ResBlock, init_values=0.1), norm_layer=mm.Affine,
                               stem_norm=False, mlp_layer=Mlp, mlp_ratio=4, **kw)
        if kind == "gmlp":
            return mm.MlpMixer(block_layer=mm.SpatialGatingBlock, mlp_layer=GatedMlp, mlp_ratio=6, **kw)
        return mm.MlpMixer(**kw)
    return build


def _regnet(se):
    def build():
        from timm.models.regnet import RegNet, RegNetCfg

        return RegNet(RegNetCfg(depth=4, w0=16, wa=12, wm=1.5, group_size=8, se_ratio=0.25 if se else 0.0,
                                stem_width=16), num_classes=10)
    return build


def _resnetv2_bit():
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1, 1, 1), channels=(32, 64, 96, 128), num_classes=10, stem_chs=16, stem_type="fixed",
                    conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=8))


def _resnext():
    from timm.models.resnet import Bottleneck

    import timm
    return timm.create_model("test_resnet", pretrained=False, num_classes=10, block=Bottleneck, cardinality=4,
                             base_width=16)


def _poolformer():
    from timm.models.metaformer import MetaFormer

    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=10)


# name -> (family, builder, input [C, H, W])
ZOO = {
    "test_resnet": ("CNN, residual", _timm("test_resnet"), (3, 32, 32)),
    "test_resnet_se": ("CNN, squeeze-excite", _timm("test_resnet", block_args=dict(attn_layer="se")), (3, 32, 32)),
    "test_resnext": ("CNN, grouped convs", _resnext, (3, 32, 32)),
    "regnetx_tiny": ("CNN, grouped convs", _regnet(False), (3, 32, 32)),
    "regnety_tiny": ("CNN, grouped convs + SE", _regnet(True), (3, 32, 32)),
    "test_byobnet": ("CNN, BYOB blocks", _timm("test_byobnet"), (3, 32, 32)),
    "test_efficientnet": ("CNN, depthwise + SE", _timm("test_efficientnet"), (3, 32, 32)),
    "test_efficientnet_same": ("CNN, TF 'same' padding", _timm("test_efficientnet", pad_type="same"), (3, 32, 32)),
    "test_efficientnet_evos": ("CNN, EvoNorm", _timm("test_efficientnet_evos"), (3, 32, 32)),
    "test_efficientnet_gn": ("CNN, GroupNorm", _timm("test_efficientnet_gn"), (3, 32, 32)),
    "test_efficientnet_ln": ("CNN, LayerNorm", _timm("test_efficientnet_ln"), (3, 32, 32)),
    "mobilenetv3_small_050": ("CNN, depthwise + SE + hard-swish", _timm("mobilenetv3_small_050"), (3, 32, 32)),
    "ghostnet_050": ("CNN, ghost modules", _timm("ghostnet_050"), (3, 32, 32)),
    "rexnet_050": ("CNN, depthwise + SE", _timm("rexnet_100", width_mult=0.5), (3, 32, 32)),
    "test_nfnet": ("CNN, weight standardisation", _timm("test_nfnet"), (3, 32, 32)),
    "resnetv2_bit_tiny": ("CNN, weight standardisation (BiT)", _resnetv2_bit, (3, 32, 32)),
    "test_convnext": ("CNN, ConvNeXt", _timm("test_convnext"), (3, 32, 32)),
    "test_convnext2": ("CNN, ConvNeXt", _timm("test_convnext2"), (3, 32, 32)),
    "test_mambaout": ("CNN, gated", _timm("test_mambaout"), (3, 32, 32)),
    "poolformer_tiny": ("MetaFormer, pooling", _poolformer, (3, 32, 32)),
    "test_vit": ("ViT", _timm("test_vit"), (3, 32, 32)),
    "test_vit2": ("ViT", _timm("test_vit2"), (3, 32, 32)),
    "test_vit4": ("ViT", _timm("test_vit4"), (3, 32, 32)),
    "test_vit_relpos": ("ViT, relative positions", _timm("test_vit_relpos", img_size=64), (3, 64, 64)),
    "convit_tiny": ("ViT, gated positional attention (FX leaf)", _timm("convit_tiny", depth=2, local_up_to_layer=1,
                                                                       img_size=32, patch_size=8), (3, 32, 32)),
    "xcit_tiny": ("ViT, cross-covariance", _timm("xcit_nano_12_p16_224", depth=2, img_size=32, patch_size=8),
                  (3, 32, 32)),
    "swin_tiny": ("ViT, windowed", _timm("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                        img_size=32, window_size=4), (3, 32, 32)),
    "pit_tiny": ("ViT, conv pooling", _timm("pit_ti_224", img_size=64, depth=(1, 1, 1)), (3, 64, 64)),
    "twins_svt_tiny": ("ViT, locally grouped (FX leaf)", _timm("twins_svt_small", embed_dims=(16, 32, 64, 128),
                                                               depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), img_size=64),
                       (3, 64, 64)),
    "mixer_tiny": ("MLP-Mixer", _mixer("mixer"), (3, 32, 32)),
    "resmlp_tiny": ("MLP-Mixer, ResMLP", _mixer("resmlp"), (3, 32, 32)),
    "gmlp_tiny": ("MLP-Mixer, gMLP", _mixer("gmlp"), (3, 32, 32)),
    "coat_lite_tiny": ("hybrid, CoaT", _timm("coat_lite_tiny", embed_dims=(16, 32, 48, 64), serial_depths=(1, 1, 1, 1),
                                             img_size=32), (3, 32, 32)),
    "levit_tiny": ("hybrid, LeViT", _timm("levit_128s", embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 2, 2),
                                          key_dim=8, img_size=64), (3, 64, 64)),
    "efficientformer_tiny": ("hybrid, EfficientFormer", _timm("efficientformer_l1", depths=(1, 1, 1, 1),
                                                              embed_dims=(16, 32, 48, 64), num_vit=1),
                             (3, 224, 224)),  # its attention biases are sized for 224 whatever img_size says
    "mobilevit_xxs": ("hybrid, MobileViT (FX leaf blocks)", _timm("mobilevit_xxs"), (3, 32, 32)),
    "edgenext_tiny": ("hybrid, EdgeNeXt", _timm("edgenext_xx_small", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
                      (3, 32, 32)),
    "efficientvit_b_tiny": ("hybrid, EfficientViT (MIT, FX leaf attention)",
                            _timm("efficientvit_b0", widths=(4, 8, 16, 32, 64), depths=(1, 1, 1, 1, 1)), (3, 32, 32)),
    "test_coatnet": ("hybrid, CoAtNet", _timm("test_coatnet", img_size=64), (3, 64, 64)),
}

#: Models whose sparse weights are mostly in layers the compiler must keep as they are (weight
#: standardisation computes a dense weight from the sparse one in every forward).
LOW_COVERAGE = {"test_nfnet": "weight-standardised convs", "resnetv2_bit_tiny": "weight-standardised convs",
                "test_efficientnet_same": "Conv2dSame (padding computed in forward) is kept as it is"}


def build(name: str, seed: int = 0):
    """(model with SRigL-like random sparse weights, example input) for zoo entry ``name``."""
    from sparse_models import random_srigl

    _, make, shape = ZOO[name]
    torch.manual_seed(seed)
    with torch.no_grad():  # no cached tensors with grad history (LeViT caches attention biases)
        model = make().eval()
        random_srigl(model, seed=seed)
    return model, torch.randn(1, *shape)


def coverage_row(name: str, report) -> dict:
    """One row of the README table from a mode-"condensed" report."""
    from sparse_compile.compiler.coverage import coverage

    c = coverage(report)
    total = max(1, c.sparse_weights)
    counted = [r for r in report if r.coverage and r.coverage != "below min_numel"]
    cond = sum(r.nnz for r in counted if r.form == "condensed")
    other = sum(r.nnz for r in counted if r.form in ("csr", "ablated_dense"))
    left = "; ".join(f"{why}: {n} layer(s), {100 * w / total:.1f}%" for why, (n, w) in c.left.items()) or "-"
    return {"model": name, "family": ZOO[name][0], "condensed": cond / total, "other_sparse": other / total,
            "left": left}


if __name__ == "__main__":
    import sys
    import warnings

    sys.path.insert(0, __import__("os").path.dirname(__file__))
    from sparse_compile import optimize

    print("| model | family | condensed | other sparse form | left dense (why) |")
    print("|---|---|---|---|---|")
    for name in ZOO:
        model, x = build(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimize(model, (x,), mode="condensed", strict=True)
        r = coverage_row(name, opt.sparse_compile_report)
        print(f"| {r['model']} | {r['family']} | {100 * r['condensed']:.1f}% | {100 * r['other_sparse']:.1f}% | "
              f"{r['left']} |", flush=True)
