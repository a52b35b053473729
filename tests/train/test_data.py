"""Data loading: digits default, CIFAR-10 pickle layout, ImageFolder ImageNet, clear errors."""
import os
import pickle

import numpy as np
import pytest
import torch

from sparse_compile.train import data


def test_digits_split_is_fixed_stratified_and_disjoint():
    tr, te = data.load_digits()
    assert (len(tr), len(te)) == (1437, 360)
    x_tr, y_tr = tr.tensors
    x_te, y_te = te.tensors
    assert x_tr.shape == (1437, 64) and x_tr.dtype == torch.float32 and 0 <= x_tr.min() and x_tr.max() <= 1
    assert torch.bincount(y_te, minlength=10).min() >= 35  # stratified: every class ~36 times
    tr2, _ = data.load_digits()
    assert torch.equal(tr2.tensors[0], x_tr)
    rows_tr = {tuple(r) for r in (x_tr * 16).round().int().tolist()}
    overlap = sum(tuple(r) in rows_tr for r in (x_te * 16).round().int().tolist())
    assert overlap < 10  # the raw set has a handful of duplicate images, not a leaked split


def _write_cifar(root, n_per_batch=4, seed=0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                 b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"filenames": [b"x.png"] * n_per_batch}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar_layout_and_normalisation(tmp_path):
    folder = _write_cifar(tmp_path)
    for root in (tmp_path, folder):  # the parent or the folder itself
        tr, te = data.build_datasets("cifar10", root, augment="cifar")
        assert (len(tr), len(te)) == (20, 4)
    raw = pickle.load(open(folder / "test_batch", "rb"), encoding="bytes")
    img, label = te[1]
    assert label == raw[b"labels"][1] and img.shape == (3, 32, 32) and img.dtype == torch.float32
    expect = torch.from_numpy(raw[b"data"][1].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(data.CIFAR_MEAN)[:, None, None], torch.tensor(data.CIFAR_STD)[:, None, None]
    torch.testing.assert_close(img, (expect - mean) / std)
    torch.manual_seed(0)
    aug = torch.stack([tr[0][0] for _ in range(8)])
    assert aug.shape == (8, 3, 32, 32) and not all(torch.equal(aug[0], a) for a in aug[1:])  # random crops/flips


def test_cifar_missing_gives_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.build_datasets("cifar10", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--data ROOT"):
        data.build_datasets("cifar10", None)


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch file"):
        data.CIFAR10(tmp_path, train=False)


def test_imagenet_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    for augment in ("imagenet-rigl", "imagenet-vit", "imagenet-mobilenet"):
        tr, te = data.build_datasets("imagenet", tmp_path, augment=augment, image_size=32, random_erasing=0.2)
        assert len(tr) == 4 and tr.classes == ["n01", "n02"]
        x, y = tr[3]
        assert x.shape == (3, 32, 32) and y == 1
        assert te[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="ROOT/train/<class>"):
        data.build_datasets("imagenet", tmp_path / "train")


def test_batch_transform_mixes_labels():
    assert data.batch_transform(0.0, 0.0, 10) is None
    tf = data.batch_transform(0.2, 1.0, 10)
    x, y = tf(torch.rand(8, 3, 16, 16), torch.arange(8))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(8))


def test_unknown_dataset_and_bad_augment():
    with pytest.raises(ValueError, match="unknown data set"):
        data.build_datasets("svhn")
    with pytest.raises(ValueError, match="no augmentation"):
        data.build_datasets("digits", augment="cifar")
