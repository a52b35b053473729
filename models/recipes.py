"""The paper's training recipes (Appendix D) as data.

>>> from sparse_compile.models.recipes import get_recipe
>>> r = get_recipe("resnet18_cifar10").override(["epochs=10", "sparsity=0.95"])
>>> print(r)

A :class:`Recipe` holds everything ``sparse-compile train`` needs: model, data, optimiser, learning
rate schedule, augmentation and the SRigL settings. ``source`` says where each recipe's numbers come
from; where the appendix is silent the field keeps the standard value of the cited training procedure
and the docstring of the recipe says so.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Iterable, Optional

from sparse_compile.train.budgets import DISTRIBUTIONS

__all__ = ["Recipe", "RECIPES", "get_recipe", "list_recipes", "METHODS", "OPTIMIZERS", "SCHEDULES", "AUGMENTS"]

METHODS = ("srigl", "rigl", "static", "dense")
OPTIMIZERS = ("sgd", "adamw", "adam", "rmsprop")
SCHEDULES = ("constant", "multistep", "step", "cosine")
AUGMENTS = ("none", "cifar", "imagenet-rigl", "imagenet-vit", "imagenet-mobilenet")
DATASETS = ("digits", "cifar10", "imagenet", "mnist", "fashion-mnist")


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run. Epoch-valued fields count epochs of the training set."""

    name: str
    model: str  # a name from sparse_compile.models.list_models()
    dataset: str  # digits | cifar10 | imagenet | mnist | fashion-mnist
    source: str  # where the numbers come from
    num_classes: int = 10
    image_size: Optional[int] = None  # None: the data set's own (32 CIFAR, 224 ImageNet)
    # --- schedule of the run
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps, if reached before `epochs`
    batch_size: int = 128  # per optimizer micro-batch (and per process under DDP)
    accumulate: int = 1  # micro-batches summed into one optimizer step
    # --- optimiser
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    rmsprop_alpha: float = 0.99  # RMSProp smoothing constant
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max global L2 norm of the gradients
    # --- learning-rate schedule (per optimizer step, expressed in epochs)
    lr_schedule: str = "constant"  # constant | multistep | step | cosine
    lr_milestones: tuple = ()  # multistep: epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1
    lr_step_epochs: float = 1.0  # step: lr *= lr_gamma every this many epochs
    warmup_epochs: float = 0.0  # linear warm-up from warmup_lr to lr
    warmup_lr: float = 0.0
    # --- data augmentation
    augment: str = "none"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    random_erasing: float = 0.0
    # --- sparse training
    method: str = "srigl"  # srigl | rigl | static | dense
    sparsity: float = 0.9
    distribution: str = "erk"  # erk | uniform
    delta_t: int = 100  # optimizer steps between topology updates
    alpha: float = 0.3  # initial drop fraction (cosine decay)
    t_end: float = 0.75  # fraction of training after which the topology is frozen
    gamma_sal: float = 0.3  # minimum salient fraction of fan-in for a neuron to stay active
    grad_accumulation: int = 1  # dense gradients of this many steps averaged for an update
    dense_qkv: bool = True  # keep attention q/k/v input projections dense (the paper's ViT setting)
    description: str = ""

    def __post_init__(self):
        def bad(what):
            raise ValueError(f"recipe {self.name!r}: {what}")

        for fname, allowed in (("method", METHODS), ("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                               ("augment", AUGMENTS), ("dataset", DATASETS), ("distribution", DISTRIBUTIONS)):
            if getattr(self, fname) not in allowed:
                bad(f"{fname} must be one of {', '.join(allowed)}, got {getattr(self, fname)!r}")
        if not 0.0 <= self.sparsity < 1.0:
            bad(f"sparsity must be in [0, 1), got {self.sparsity}")
        for fname in ("epochs", "batch_size", "accumulate", "delta_t", "grad_accumulation", "num_classes"):
            if getattr(self, fname) < 1:
                bad(f"{fname} must be >= 1, got {getattr(self, fname)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.lr <= 0:
            bad(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.t_end <= 1.0:
            bad(f"t_end must be in (0, 1], got {self.t_end}")
        if not 0.0 <= self.alpha < 1.0 or not 0.0 <= self.gamma_sal <= 1.0:
            bad(f"alpha must be in [0, 1) and gamma_sal in [0, 1], got {self.alpha}, {self.gamma_sal}")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            bad(f"lr_milestones must be increasing, got {self.lr_milestones}")

    # --- printing and overriding

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """Inverse of :meth:`to_dict` (lists back to tuples); unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"recipe dict has unknown field(s) {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def __str__(self) -> str:
        items = self.to_dict()
        w = max(map(len, items))
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in items.items())

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes`` applied (validated; unknown names raise ValueError)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"recipe {self.name!r}: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def override(self, assignments: Iterable[str]) -> "Recipe":
        """A copy with ``["key=value", ...]`` applied, each value parsed to the field's type.

        Tuples are comma separated (``lr_milestones=30,60``); ``none`` sets an optional field to None.
        """
        changes = {}
        hints = typing.get_type_hints(Recipe)
        for a in assignments:
            key, sep, raw = a.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise ValueError(f"override {a!r}: expected KEY=VALUE")
            if key not in hints:
                self.replace(**{key: None})  # raises the unknown-field error with the known names
            changes[key] = _parse(key, raw.strip(), hints[key])
        return self.replace(**changes)


def _parse(key: str, raw: str, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is tuple:
            return tuple(float(v) if any(c in v for c in ".e") else int(v) for v in raw.split(",") if v.strip())
        return raw
    except ValueError as e:
        raise ValueError(f"override {key}={raw!r}: cannot parse as {getattr(hint, '__name__', hint)} ({e})") from None


_CIFAR = dict(
    dataset="cifar10", num_classes=10, epochs=250, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
    weight_decay=5e-4, lr_schedule="multistep", lr_milestones=(77, 154, 231), lr_gamma=0.2, augment="cifar",
    distribution="erk", delta_t=100, alpha=0.3, t_end=0.75, gamma_sal=0.3,
)

_MNIST = dict(
    num_classes=10, epochs=10, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0,
    lr_schedule="cosine", augment="none", distribution="erk", delta_t=100, alpha=0.3, t_end=0.75, gamma_sal=0.3,
)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="resnet18_cifar10", model="resnet18_cifar", source="Appendix D.1", **_CIFAR,
            description="250 epochs (97,656 steps) of batch 128, SGD lr 0.1 divided by 5 every 77 epochs.",
        ),
        Recipe(
            name="wrn22_cifar10", model="wide_resnet22_cifar", source="Appendix C (same as D.1)", **_CIFAR,
            description="Wide ResNet-22-2, trained exactly as ResNet-18 on CIFAR-10 (Appendix C).",
        ),
        Recipe(
            name="resnet50_imagenet", model="resnet50", source="Appendix D.2", dataset="imagenet",
            num_classes=1000, image_size=224, epochs=103, max_steps=256_000, batch_size=512, optimizer="sgd",
            lr=0.2, momentum=0.9, weight_decay=1e-4, label_smoothing=0.1, lr_schedule="multistep",
            lr_milestones=(30, 70, 90), lr_gamma=0.1, warmup_epochs=5, warmup_lr=0.0, augment="imagenet-rigl",
            distribution="erk", delta_t=800, alpha=0.3, t_end=0.75, gamma_sal=0.3, grad_accumulation=8,
            description="256,000 steps of batch 512 (about 102.3 epochs); linear warm-up to 0.2 over 5 "
                        "epochs (from 0: the appendix gives no start value); dense gradients averaged over 8 "
                        "steps for each update.",
        ),
        Recipe(
            name="vit_b_16_imagenet", model="vit_b_16", source="Appendix D.3", dataset="imagenet",
            num_classes=1000, image_size=224, epochs=150, batch_size=512, accumulate=8, optimizer="adamw",
            lr=0.003, betas=(0.9, 0.999), weight_decay=0.3, label_smoothing=0.11, grad_clip=1.0,
            lr_schedule="cosine", warmup_epochs=16, warmup_lr=9.9e-5, augment="imagenet-vit", mixup_alpha=0.2,
            cutmix_alpha=1.0, distribution="uniform", delta_t=100, alpha=0.3, t_end=0.75, gamma_sal=0.95,
            dense_qkv=True,
            description="8 accumulated micro-batches of 512 (effective 4096); sparse: patch projection, MLP "
                        "and attention out-projection, dense q/k/v input projections; no dropout.",
        ),
        *(
            Recipe(
                name=f"{m}_imagenet", model=m, source="Appendix D.4 (torchvision MobileNet-V3 recipe)",
                dataset="imagenet", num_classes=1000, image_size=224, epochs=600, batch_size=512, accumulate=2,
                optimizer="rmsprop", lr=0.064, momentum=0.9, weight_decay=1e-5, rmsprop_alpha=0.9, eps=0.0316,
                lr_schedule="step", lr_step_epochs=2, lr_gamma=0.973, augment="imagenet-mobilenet",
                random_erasing=0.2, distribution="erk", delta_t=100, alpha=0.3, t_end=0.75, gamma_sal=0.3,
                description="RMSProp (eps 0.0316 from torchvision's recipe), lr 0.064 x 0.973 every 2 epochs, "
                            "2 accumulated micro-batches of 512; no dropout.",
            )
            for m in ("mobilenet_v3_large", "mobilenet_v3_small")
        ),
        Recipe(
            name="digits_mlp", model="mlp", source="this project (the embedded demo data set)", dataset="digits",
            num_classes=10, epochs=40, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4,
            lr_schedule="cosine", augment="none", distribution="erk", delta_t=50, alpha=0.3, t_end=0.75,
            gamma_sal=0.3,
            description="64-300-100-10 MLP on scikit-learn's 8x8 digits (1,437 train / 360 test images).",
        ),
        Recipe(
            name="lenet300_100_mnist", model="lenet300_100", source="this project (the standard sparse-training "
            "MLP, LeCun 1998; bench/accuracy.py)", dataset="mnist", **_MNIST,
            description="LeNet-300-100 (784-300-100-10) on MNIST's 60,000 / 10,000 images: 10 epochs of "
                        "batch 128, SGD lr 0.1 momentum 0.9, cosine decay, no weight decay or augmentation.",
        ),
        Recipe(
            name="small_cnn_fashion_mnist", model="small_cnn", source="this project (bench/accuracy.py)",
            dataset="fashion-mnist", **_MNIST,
            description="Small CNN (conv 5x5 x8, max-pool, conv 5x5 x16, max-pool, fc 784-64, fc 64-10; "
                        "ReLU) on Fashion-MNIST's 60,000 / 10,000 images, trained as lenet300_100_mnist.",
        ),
    )
}


def list_recipes() -> list[str]:
    """Names of the built-in recipes, sorted."""
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The built-in recipe ``name`` (ValueError listing the known names if unknown)."""
    r = RECIPES.get(name)
    if r is None:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    return r
