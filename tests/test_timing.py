"""sparse_compile.timing: the CPU timer works and stays quiet on a machine without CUDA."""
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the log line only appears without a CUDA runtime")
def test_cpu_timer_does_not_log_the_missing_cuda_runtime():
    # torch.utils.benchmark imports cpp_extension, which logs "No CUDA runtime is found" at import on a
    # CPU-only machine; a fresh process is needed because the import happens once.
    code = ("import torch\nfrom sparse_compile.timing import time_cpu\n"
            "t = time_cpu(lambda: torch.ones(3) + 1, min_blocks=1, min_run_time=0)\nprint(t.median_us > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert "No CUDA runtime" not in out.stderr, out.stderr
