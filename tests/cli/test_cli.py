"""The sparse-compile console script."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import sparse_compile
from sparse_compile.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparse-compile {sparse_compile.__version__}"


def test_console_script_installed():
    exe = shutil.which("sparse-compile") or str(__import__("pathlib").Path(sys.executable).parent / "sparse-compile")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert sparse_compile.__version__ in out


def test_inspect_checkpoint_file(tmp_path, capsys):
    from safetensors.torch import save_file

    w = torch.zeros(6, 10)
    w[:4, :3] = 1.0  # 4 active neurons with fan-in 3, 2 ablated
    mask = w != 0
    save_file({"fc.weight": w, "fc.weight_mask": mask, "fc.bias": torch.zeros(6)}, str(tmp_path / "m.safetensors"))
    assert main(["inspect", str(tmp_path / "m.safetensors"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    (layer,) = d["layers"]
    assert layer["name"] == "fc" and layer["active"] == 4 and layer["ablated"] == 2 and layer["fan_in_max"] == 3


def test_inspect_missing_target_is_a_clear_error(capsys):
    assert main(["inspect", "no_such_file_or_model"]) == 1
    assert "neither a file" in capsys.readouterr().err
