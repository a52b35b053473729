"""The package installs both ways: editable (what `make` does) and as a regular wheel."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sparse_compile

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_and_models_are_subpackages_not_top_level():
    import sparse_compile.kernels as k
    import sparse_compile.models as m

    assert k.__name__ == "sparse_compile.kernels" and m.__name__ == "sparse_compile.models"
    assert k.condensed_linear.__module__.startswith("sparse_compile.kernels")


@pytest.mark.slow
def test_regular_wheel_install(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (whl,) = wheel_dir.glob("sparse_compile-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "sparse_compile/kernels/__init__.py" in names
    assert "sparse_compile/models/__init__.py" in names
    assert "sparse_compile/commands/inspect.py" in names
    assert "sparse_compile/kernels/csrc/condensed_cpu.cpp" in names
    assert not any(n.startswith(("kernels/", "models/", "tests/", "bench/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
        check=True, capture_output=True,
    )
    code = (
        "import sparse_compile, sparse_compile.kernels, sparse_compile.models, torch;"
        "print(sparse_compile.kernels.__file__);"
        "print(hasattr(torch.ops.sparse_compile, 'condensed_linear'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    assert out[0].startswith(str(target)), out
    assert out[1] == "True"


def test_editable_install_points_at_source_tree():
    import sparse_compile.kernels as k

    if not Path(k.__file__).resolve().is_relative_to(ROOT):
        pytest.skip(f"sparse_compile is not installed editable from {ROOT} (found {k.__file__})")
    assert Path(k.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert Path(sparse_compile.__file__).resolve() == ROOT / "sparse_compile" / "__init__.py"
