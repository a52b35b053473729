"""Shared helpers for the bench scripts: timing, machine info, result files.

They live in the installed module :mod:`sparse_compile.benchmark` (so ``sparse-compile bench`` uses
the same code); this module re-exports them for the scripts under ``bench/``::

    from bench.common import time_fn, machine_info, write_results
    t = time_fn(fn, x, device="cpu", threads=1)      # Timing: median_us, q25_us, q75_us, iqr_us, n
    write_results("bench/out", "mine", {"machine": machine_info("cpu")}, rows)   # JSON + CSV
"""
from sparse_compile.benchmark import (  # noqa: F401
    Timing,
    cpu_model,
    machine_info,
    num_threads,
    read_results,
    result_paths,
    time_cpu,
    time_fn,
    time_gpu,
    write_results,
)

__all__ = ["Timing", "cpu_model", "machine_info", "num_threads", "read_results", "result_paths",
           "time_cpu", "time_fn", "time_gpu", "write_results"]
