"""What ``optimize`` says: warnings for nothing to do and for patterns that match nothing, a plain
reason for a dense layer in mode "condensed", one-line device errors, and progress lines only when slow."""
import time

import pytest
import torch
from torch import nn

import sparse_compile
from sparse_compile import progress


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


def _mlp(sparse: bool):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if sparse:
        sparse_compile.SRigL(m, None, sparsity=0.9, total_steps=10).remove()
    return m.eval()


def test_a_model_without_sparse_layers_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"Sequential has no sparse layer .*load_checkpoint"):
        opt = sparse_compile.optimize(_mlp(False), (torch.randn(1, 64),), mode="auto", repeats=2)
    assert set(opt.sparse_compile_report.forms().values()) == {"dense"}


def test_a_sparse_model_gives_no_such_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sparse_compile.optimize(_mlp(True), (torch.randn(1, 64),), mode="condensed")


def test_ablated_neurons_without_masks_are_sparse_enough_to_say_nothing():
    """Zero rows (ablated neurons) are what ablated_dense removes: no "nothing to gain" warning."""
    import warnings

    m = _mlp(False)
    with torch.no_grad():
        m[0].weight[[1, 4, 7]] = 0  # 3 of 128 neurons: far below half of the weights
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt = sparse_compile.optimize(m, (torch.randn(1, 64),), mode="ablated_dense")
    assert opt.sparse_compile_report.forms()["0"] == "ablated_dense"


def test_a_mode_pattern_that_matches_no_layer_is_named():
    with pytest.warns(UserWarning, match=r"mode pattern\(s\) \['fc\*'\] match no Linear/Conv2d layer .*its layers: 0, 2"):
        opt = sparse_compile.optimize(_mlp(True), (torch.randn(1, 64),), mode={"fc*": "condensed", "0": "condensed"})
    assert opt.sparse_compile_report.forms()["0"] == "condensed"


def test_condensed_on_a_dense_layer_says_it_is_not_sparse():
    m = _mlp(False)
    with torch.no_grad():
        m[0].weight[:3, :5] = 0.0  # a few exact zeros, as an initialisation may have
    with pytest.warns(UserWarning, match="no sparse layer"):
        with pytest.raises(ValueError, match=r"layer '0' is not sparse: no weight_mask buffer and only 0\.\d+%"):
            sparse_compile.optimize(m, (torch.randn(1, 64),), mode="condensed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(ValueError, match=r"^optimize: device 'cuda' asked for, but CUDA is not available") as e:
        sparse_compile.optimize(_mlp(True), (torch.randn(1, 64),), mode="condensed", device="cuda")
    assert "\n" not in str(e.value)


def test_progress_lines_only_when_slow(monkeypatch, capsys):
    monkeypatch.delenv("SPARSE_COMPILE_QUIET", raising=False)
    monkeypatch.setattr(progress, "DELAY_S", 0.05)
    with progress.slow("doing a slow thing", "slow thing done"):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "doing a slow thing ..." in err and "slow thing done in 0." in err
    with progress.slow("a fast thing"):
        pass
    assert capsys.readouterr().err == ""
    t = progress.Ticker("timing layer", 3)
    t.tick(0, "a")  # within the delay: silent
    time.sleep(0.1)
    t.tick(1, "b")
    t.close()
    err = capsys.readouterr().err
    assert "timing layer 1/3 (b)" in err and "timing layer 3/3 done in" in err
    monkeypatch.setenv("SPARSE_COMPILE_QUIET", "1")
    with progress.slow("silenced"):
        time.sleep(0.2)
    assert capsys.readouterr().err == ""
