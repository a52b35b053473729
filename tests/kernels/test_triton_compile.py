"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one, without spills.

The interpreter the other Triton tests use on CPU does not run triton's compiler, so type and
layout errors of the real kernels would otherwise surface only on a GPU machine. Every shipped
autotune config of the batched and GEMV linear kernels (fp32 and bf16) and of the conv kernel is
compiled with triton's own ptxas (bench/triton_compile_report.py), which must report no spill
stores or loads: a spilling config would run from local memory on the GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    # A subprocess because TRITON_INTERPRET=1 (set by conftest without a GPU) turns triton's own
    # library functions into interpreter objects at import time.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "bench.triton_compile_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_shipped_configs_compile_for_sm90_without_spills():
    r = _run("--check")
    if r.returncode == 77:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [line for line in r.stdout.splitlines() if " regs " in line]
    # fp32 and bf16 rows of both linear kernels, and the conv rows, were all compiled.
    for kind in ("fm   fp32", "fm   bf16", "gemv fp32", "gemv bf16", "conv fp32"):
        assert any(row.strip().startswith(kind) for row in rows), kind
    assert all("spill 0/0" in row for row in rows)
