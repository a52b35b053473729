"""Recipes: Appendix D values, printing, CLI-style overrides and validation."""
import json

import pytest

from sparse_compile.models import list_models
from sparse_compile.models.recipes import RECIPES, get_recipe, list_recipes


def test_every_recipe_names_a_registered_model_and_prints():
    assert {"resnet18_cifar10", "wrn22_cifar10", "resnet50_imagenet", "vit_b_16_imagenet",
            "mobilenet_v3_large_imagenet", "mobilenet_v3_small_imagenet", "digits_mlp"} <= set(list_recipes())
    for name, r in RECIPES.items():
        assert r.model in list_models(), name
        text = str(r)
        assert name in text and "delta_t" in text
        assert json.loads(json.dumps(r.to_dict()))["name"] == name


def test_appendix_d_values():
    r18 = get_recipe("resnet18_cifar10")
    assert (r18.epochs, r18.batch_size, r18.lr, r18.weight_decay, r18.lr_gamma) == (250, 128, 0.1, 5e-4, 0.2)
    assert r18.lr_milestones == (77, 154, 231) and r18.distribution == "erk" and r18.gamma_sal == 0.3
    r50 = get_recipe("resnet50_imagenet")
    assert (r50.delta_t, r50.grad_accumulation, r50.max_steps, r50.label_smoothing) == (800, 8, 256_000, 0.1)
    vit = get_recipe("vit_b_16_imagenet")
    assert vit.distribution == "uniform" and vit.dense_qkv and vit.optimizer == "adamw"
    assert (vit.accumulate, vit.warmup_epochs, vit.warmup_lr, vit.grad_clip) == (8, 16, 9.9e-5, 1.0)
    mb = get_recipe("mobilenet_v3_small_imagenet")
    assert (mb.optimizer, mb.lr, mb.lr_gamma, mb.lr_step_epochs, mb.epochs) == ("rmsprop", 0.064, 0.973, 2, 600)


def test_override_parses_types_and_keeps_original():
    r = get_recipe("resnet18_cifar10")
    o = r.override(["epochs=3", "sparsity=0.95", "lr_milestones=1,2", "nesterov=true", "grad_clip=0.5",
                    "method=rigl"])
    assert (o.epochs, o.sparsity, o.lr_milestones, o.nesterov, o.grad_clip, o.method) == \
        (3, 0.95, (1, 2), True, 0.5, "rigl")
    assert r.epochs == 250  # frozen original untouched
    assert o.override(["grad_clip=none"]).grad_clip is None


@pytest.mark.parametrize("bad, match", [
    (["sparsity=1.5"], "sparsity"),
    (["epochs=zero"], "epochs"),
    (["no_such_field=1"], "unknown field"),
    (["method=magic"], "method must be one of"),
    (["epochs"], "KEY=VALUE"),
    (["lr_milestones=5,2"], "increasing"),
])
def test_bad_override_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        get_recipe("digits_mlp").override(bad)


def test_unknown_recipe_lists_known():
    with pytest.raises(ValueError, match="digits_mlp"):
        get_recipe("nope")
