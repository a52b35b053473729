"""``sparse-compile train``: outputs, resume, errors, every method, real CIFAR layout, DDP with gloo."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparse_compile.checkpoint import load_state_dict
from sparse_compile.cli import main
from sparse_compile.analysis.inspect import inspect

@pytest.fixture(autouse=True)
def _one_thread():
    """The digits MLP is tiny: one thread avoids oversubscribing a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FAST = ["--set", "delta_t=10", "--no-progress", "--device", "cpu"]  # several topology updates per epoch


def _run(argv, capsys=None):
    rc = main(argv)
    return rc, (capsys.readouterr() if capsys is not None else None)


def test_train_digits_writes_checkpoint_model_report_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    rc, cap = _run(["train", "--recipe", "digits_mlp", "--epochs", "2", "--sparsity", "0.8", "--out", str(out), *FAST],
                   capsys)
    assert rc == 0
    assert {"checkpoint.pt", "model.safetensors", "report.json"} <= {p.name for p in out.iterdir()}
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"]["sparsity"] == 0.8 and rep["epochs_done"] == 2 and len(rep["history"]) == 2
    assert 0.5 < rep["test_accuracy"] <= 1.0  # 2 epochs on digits learn something
    assert rep["sparsifier"]["updates"] >= 2 and rep["steps"] == 88
    assert abs(rep["sparsifier"]["sparsity"] - 0.8) < 0.01
    table = inspect(load_state_dict(out / "model.safetensors"))
    assert [r.name for r in table] == ["fc1", "fc2", "fc3"] and all(r.constant_fan_in for r in table)
    assert abs(table.sparsity - rep["sparsifier"]["sparsity"]) < 1e-6
    assert "fc1" in cap.out and "global sparsity" in cap.out and "test accuracy" in cap.out
    from sparse_compile.checkpoint import checkpoint_metadata  # what `optimize` infers --model from
    assert checkpoint_metadata(out / "model.safetensors")["model"] == "mlp"
    assert checkpoint_metadata(out / "checkpoint.pt")["model"] == "mlp"


def test_resume_is_bit_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["train", "--recipe", "digits_mlp", "--epochs", "3", *FAST, "--seed", "3"]
    assert main([*args, "--out", str(full)]) == 0
    assert main([*args, "--out", str(part), "--stop-after-epochs", "1"]) == 0
    assert json.loads((part / "report.json").read_text())["epochs_done"] == 1
    assert main([*args, "--out", str(part), "--resume"]) == 0
    a, b = load_state_dict(full / "model.safetensors"), load_state_dict(part / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("weight_mask") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (full, part))
    assert ra["history"] == rb["history"]
    # --resume without --recipe takes it from the checkpoint (nothing left to train: still exits 0)
    assert main(["train", "--resume", "--out", str(part), "--no-progress"]) == 0


def test_resume_and_argument_errors(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--recipe", "digits_mlp", "--out", str(out), "--resume", *FAST]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--out", str(out), *FAST]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--sparsity", "0.5", "--out", str(out),
                 "--resume", *FAST]) == 1
    assert "sparsity (saved 0.9, now 0.5)" in capsys.readouterr().err
    assert main(["train", "--recipe", "nope", "--out", str(out)]) == 1
    assert "digits_mlp" in capsys.readouterr().err
    assert main(["train", "--recipe", "digits_mlp", "--set", "lr=fast", "--out", str(out)]) == 1
    assert "lr" in capsys.readouterr().err
    assert main(["train", "--recipe", "resnet18_cifar10", "--out", str(tmp_path / "c"), *FAST]) == 1
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert main(["train", "--recipe", "vit_b_16_imagenet", "--print-recipe"]) == 0
    printed = capsys.readouterr().out
    assert "dense_qkv" in printed and "0.003" in printed


@pytest.mark.parametrize("method", ["dense", "static", "rigl"])
def test_other_methods(tmp_path, method):
    out = tmp_path / method
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--method", method, "--out", str(out), *FAST]) == 0
    rep = json.loads((out / "report.json").read_text())
    sd = load_state_dict(out / "model.safetensors")
    masks = [k for k in sd if k.endswith("weight_mask")]
    if method == "dense":
        assert rep["sparsifier"] is None and not masks
    else:
        assert rep["sparsifier"]["method"] == {"static": "StaticSparse", "rigl": "RigL"}[method]
        assert len(masks) == 3 and abs(rep["sparsifier"]["sparsity"] - 0.9) < 0.01
        assert (rep["sparsifier"]["updates"] > 0) == (method == "rigl")


def test_cifar_layout_end_to_end(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"labels": rng.integers(0, 10, 4).tolist(),
                         b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}, f, protocol=2)
    out = tmp_path / "wrn"
    assert main(["train", "--recipe", "wrn22_cifar10", "--data", str(tmp_path / "data"), "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--set", "delta_t=1", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == 5 and rep["sparsifier"]["updates"] == 2  # 20 images / 4; updates at 1, 2 < 0.75 * 5
    assert abs(rep["sparsifier"]["sparsity"] - 0.9) < 0.01


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparse_compile.cli", "train", "--recipe", "digits_mlp", "--epochs", "1", "--out", str(out), *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["ranks_consistent"] is True
    assert rep["steps"] == 22 and rep["sparsifier"]["updates"] >= 1  # 1437 / 2 ranks / 32 per rank
    assert proc.stdout.count("test accuracy") == 2  # per-epoch line + final line, from rank 0 only


def test_lr_schedules_follow_the_recipes():
    from sparse_compile.train.loop import lr_factor, resolve_recipe

    r18 = resolve_recipe("resnet18_cifar10")
    f = lr_factor(r18, steps_per_epoch=10, total_steps=2500)
    assert [f(s) for s in (0, 769, 770, 1540, 2310)] == pytest.approx([1, 1, 0.2, 0.04, 0.008])
    vit = resolve_recipe("vit_b_16_imagenet")
    f = lr_factor(vit, steps_per_epoch=10, total_steps=1500)
    assert f(0) * vit.lr == pytest.approx(9.9e-5) and f(160) == pytest.approx(1.0)
    assert f(80) * vit.lr == pytest.approx((9.9e-5 + 0.003) / 2) and f(1500) == pytest.approx(0.0, abs=1e-12)
    mb = resolve_recipe("mobilenet_v3_small_imagenet")
    f = lr_factor(mb, steps_per_epoch=10, total_steps=6000)
    assert [f(s) for s in (19, 20, 40)] == pytest.approx([1, 0.973, 0.973 ** 2])


def test_recipe_settings_reach_optimizer_and_sparsifier():
    from sparse_compile.train.loop import build_model, build_optimizer, build_sparsifier, resolve_recipe

    r = resolve_recipe("digits_mlp", overrides=["gamma_sal=0.5", "distribution=uniform", "delta_t=7",
                                                "optimizer=rmsprop", "eps=0.0316", "rmsprop_alpha=0.9"])
    model = build_model(r)
    opt = build_optimizer(r, model.parameters())
    assert isinstance(opt, torch.optim.RMSprop)
    assert (opt.defaults["alpha"], opt.defaults["eps"], opt.defaults["momentum"]) == (0.9, 0.0316, 0.9)
    sp = build_sparsifier(r, model, opt, total_steps=100)
    assert (sp.gamma_sal, sp.distribution, sp.delta_t, sp.total_steps) == (0.5, "uniform", 7, 100)
    assert build_sparsifier(r.replace(method="dense"), model, opt, 100) is None


def test_plot_itop_reads_the_report_train_writes(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot-itop draws with matplotlib (extra 'demo')")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--out", str(out), *FAST]) == 0
    rep = json.loads((out / "report.json").read_text())
    updates = rep["sparsifier"]["updates"]
    capsys.readouterr()
    png = tmp_path / "itop.png"
    assert main(["plot-itop", str(out / "report.json"), "-o", str(png)]) == 0
    text = capsys.readouterr().out
    assert png.stat().st_size > 0 and f"{updates + 1} points" in text  # the initial state + every update
    dense = tmp_path / "dense"
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--method", "dense", "--out", str(dense),
                 *FAST]) == 0
    assert main(["plot-itop", str(dense / "report.json"), "-o", str(png)]) == 1
    assert "dense training run" in capsys.readouterr().err


def test_threads_default_to_one_for_a_small_model_and_are_restored(tmp_path, capsys):
    torch.set_num_threads(2)  # the autouse fixture restores the caller's count afterwards
    out = tmp_path / "run"
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--out", str(out), *FAST]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["threads"] == 1 and rep["workers"] == 0  # 50k parameters, in-memory data
    assert "1 CPU thread(s), 0 data-loader worker(s)" in capsys.readouterr().out
    assert torch.get_num_threads() == 2  # train() gives the caller its thread count back
    out2 = tmp_path / "run2"
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--threads", "2", "--out", str(out2), *FAST]) == 0
    assert json.loads((out2 / "report.json").read_text())["threads"] == 2
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--threads", "0", "--out", str(tmp_path / "r3"),
                 *FAST]) == 1
    assert "threads must be an integer >= 1" in capsys.readouterr().err


def test_default_workers_leave_a_core_for_training(monkeypatch):
    from sparse_compile.train import loop

    assert loop.default_workers("digits") == 0
    monkeypatch.setattr(loop.os, "cpu_count", lambda: 2)
    assert loop.default_workers("cifar10") == 1
    monkeypatch.setattr(loop.os, "cpu_count", lambda: 64)
    assert loop.default_workers("imagenet") == 4


def test_model_args_reach_the_builder_the_checkpoint_and_optimize(tmp_path, capsys):
    """--model-arg widens digits' MLP; optimize rebuilds the same widths from the checkpoint."""
    from sparse_compile.checkpoint import checkpoint_metadata

    out = tmp_path / "wide"
    args = ["train", "--recipe", "digits_mlp", "--epochs", "1", "--model-arg", "hidden=[48,24]", *FAST]
    assert main([*args, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model_args"] == {"hidden": [48, 24]}
    assert [layer["shape"] for layer in rep["inspect"]["layers"]] == [[48, 64], [24, 48], [10, 24]]
    assert json.loads(checkpoint_metadata(out / "model.safetensors")["model_args"]) == {"hidden": [48, 24]}
    capsys.readouterr()
    # resuming with other widths is refused by name, not by a state-dict shape error
    assert main(["train", "--recipe", "digits_mlp", "--epochs", "1", "--model-arg", "hidden=[32,16]", *FAST,
                 "--out", str(out), "--resume"]) == 1
    assert "model arguments {'hidden': [48, 24]}" in capsys.readouterr().err
    assert main(["optimize", str(out / "model.safetensors"), "--mode", "dense", "--no-cache",
                 "-o", str(tmp_path / "w.sc")]) == 0
    assert "'mlp' with hidden=[48, 24] (recorded in the checkpoint)" in capsys.readouterr().err
    assert main(["train", "--recipe", "digits_mlp", "--model-arg", "width=3", "--out", str(tmp_path / "x"),
                 *FAST]) == 1
    assert "takes no argument 'width'" in capsys.readouterr().err


def test_end_worker_returns_without_a_process_group():
    """Only a torchrun worker (an initialised group) is ended; a single process returns normally."""
    from sparse_compile.train.distributed import end_worker

    assert not torch.distributed.is_initialized()
    assert end_worker(0) is None
