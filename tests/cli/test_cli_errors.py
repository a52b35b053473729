"""User mistakes on the command line: one clear line on stderr, exit status 1, inputs never overwritten."""
import json
import shutil

import pytest
import torch

from sparse_compile.checkpoint import example_path
from sparse_compile.cli import main


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSE_COMPILE_TRACEBACK", raising=False)


@pytest.fixture
def ck(tmp_path):
    p = tmp_path / "ck.safetensors"
    shutil.copy(example_path(), p)
    return p


def _error(capsys, argv, *needles):
    """Run the CLI, expect exit 1 and exactly one stderr line naming the problem."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sparse-compile {argv[0]}: error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _files(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "text.txt").write_text("hello, this is not a checkpoint\n")
    (tmp_path / "text.safetensors").write_text("hello, this is not a checkpoint\n")
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)))
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x02garbage")
    return tmp_path


@pytest.mark.parametrize("cmd", ["inspect", "optimize"])
@pytest.mark.parametrize("name,needle", [
    ("adir", "is a folder, not a checkpoint file"),
    ("empty.safetensors", "is empty, not a checkpoint file"),
    ("text.txt", "neither safetensors nor a torch file"),
    ("text.safetensors", "is not a readable safetensors file"),
    ("garbage.pt", "neither safetensors nor a torch file"),
    ("pickle.pt", "is not a readable torch checkpoint"),
])
def test_bad_checkpoint_files(tmp_path, capsys, cmd, name, needle):
    d = _files(tmp_path)
    argv = [cmd, d / name] + (["--model", "mlp"] if cmd == "optimize" else [])
    line = _error(capsys, argv, needle)
    assert "101" not in line  # the old, meaningless "error: 101"


def test_bad_device(ck, capsys):
    _error(capsys, ["optimize", ck, "--model", "mlp", "--device", "bogus"], "--device 'bogus' is not a device name")
    _error(capsys, ["train", "--recipe", "digits_mlp", "--out", ck.parent / "run", "--device", "bogus"],
           "--device 'bogus' is not a device name")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(ck, capsys):
    _error(capsys, ["optimize", ck, "--model", "mlp", "--device", "cuda"], "CUDA is not available")
    _error(capsys, ["train", "--recipe", "digits_mlp", "--out", ck.parent / "run", "--device", "cuda"],
           "CUDA is not available")


def test_output_is_a_folder(ck, tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    _error(capsys, ["optimize", ck, "--model", "mlp", "-o", tmp_path / "outdir"], "is a folder; give a file name")


def test_unknown_model_arg(ck, capsys):
    _error(capsys, ["optimize", ck, "--model", "mlp", "--model-arg", "foo=1"],
           "--model-arg foo: model 'mlp' has no such argument", "hidden")


def test_num_classes_that_does_not_fit(ck, capsys):
    _error(capsys, ["optimize", ck, "--model", "mlp", "--num-classes", "7"],
           "--num-classes 7 does not fit the checkpoint", "10 outputs")


def test_never_overwrites_the_input(ck, capsys):
    before = ck.read_bytes()
    _error(capsys, ["optimize", ck, "--model", "mlp", "-o", ck], "is the input file")
    _error(capsys, ["optimize", ck, "--model", "mlp", "-o", ck.parent / "." / ck.name, "--force"], "is the input file")
    assert ck.read_bytes() == before


def test_existing_output_needs_force_and_inspect_reads_sc(ck, tmp_path, capsys):
    out = tmp_path / "m.sc"
    assert main(["optimize", str(ck), "--model", "mlp", "--mode", "condensed", "-o", str(out)]) == 0
    capsys.readouterr()
    first = out.read_bytes()
    _error(capsys, ["optimize", ck, "--model", "mlp", "--mode", "condensed", "-o", out], "exists; pass --force")
    assert out.read_bytes() == first
    assert main(["optimize", str(ck), "--model", "mlp", "--mode", "dense", "-o", str(out), "--force"]) == 0
    capsys.readouterr()
    assert main(["optimize", str(ck), "--model", "mlp", "--mode", "condensed", "-o", str(out), "--force"]) == 0
    capsys.readouterr()

    # inspect understands the optimized file: its condensed layers are listed
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "optimized model" in text and "condensed" in text
    assert main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    forms = {r["name"]: r["form"] for r in d["layers"]}
    assert d["optimized"] and "condensed" in forms.values()
    assert all(r["k"] > 0 for r in d["layers"] if r["form"] == "condensed")
    # optimize refuses an already optimized file as its checkpoint
    _error(capsys, ["optimize", out, "--model", "mlp", "-o", tmp_path / "again.sc"], "already an optimized model")


def test_out_at_an_existing_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _error(capsys, ["train", "--recipe", "digits_mlp", "--out", f], "is a file; --out names the run's folder")
    assert f.read_text() == "x"


def test_traceback_flag_and_env(tmp_path, capsys, monkeypatch):
    d = _files(tmp_path)
    assert main(["inspect", str(d / "text.txt"), "--traceback"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("SPARSE_COMPILE_TRACEBACK", "1")
    assert main(["inspect", str(d / "adir")]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
