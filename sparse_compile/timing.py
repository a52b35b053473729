"""Every timer of the package: per-call medians for "auto" (:func:`time_call`), interleaved
whole-model rounds (:func:`interleaved_times`), and the benchmark's quartile timings (:func:`time_fn`:
``torch.utils.benchmark`` on CPU, ``triton.testing.do_bench`` or CUDA events on GPU).

Ratios are only ever taken between figures of the same run.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import platform
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass
class Timing:
    """One timed configuration: median and quartiles of per-call times, in microseconds."""

    median_us: float
    q25_us: float
    q75_us: float
    n: int  # number of measurements (blocks of calls) the quantiles are taken over
    method: str

    @property
    def iqr_us(self) -> float:
        """Interquartile range (the spread shown as error bars)."""
        return self.q75_us - self.q25_us

    def to_dict(self) -> dict:
        """Flat dict for the result rows."""
        return {
            "median_us": self.median_us,
            "q25_us": self.q25_us,
            "q75_us": self.q75_us,
            "iqr_us": self.iqr_us,
            "n_measurements": self.n,
            "timer": self.method,
        }


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@contextlib.contextmanager
def num_threads(n: Optional[int]):
    """Run the body with ``torch.set_num_threads(n)`` (no change when ``n`` is None), then restore."""
    old = torch.get_num_threads()
    if n is not None:
        if int(n) < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_cpu(
    fn: Callable,
    *args,
    threads: Optional[int] = None,
    min_run_time: float = 0.2,
    min_blocks: int = 5,
    block_time: float = 0.01,
    warmup: int = 3,
) -> Timing:
    """Time ``fn(*args)`` on CPU with ``torch.utils.benchmark.Timer``.

    The number of calls per block is chosen so a block lasts about ``block_time`` seconds (short
    calls would otherwise be dominated by timer overhead); blocks are repeated until at least
    ``min_blocks`` blocks and ``min_run_time`` seconds. ``min_blocks=1, min_run_time=0`` is a
    one-shot measurement for smoke tests.
    """
    from .kernels.cpu import import_cpp_extension_quietly

    import_cpp_extension_quietly()
    from torch.utils.benchmark import Timer

    threads = torch.get_num_threads() if threads is None else int(threads)
    with num_threads(threads):
        for _ in range(max(0, warmup)):
            fn(*args)
    timer = Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}, num_threads=threads)
    number = 1
    while True:
        t = timer.timeit(number).median * number
        if t >= block_time or number >= 10**6:
            break
        number = min(10**6, max(number * 2, int(number * block_time / max(t, 1e-9) * 1.1)))
    times = []
    start = time.perf_counter()
    while len(times) < max(1, min_blocks) or time.perf_counter() - start < min_run_time:
        times.append(timer.timeit(number).median)
    times.sort()
    us = [t * 1e6 for t in times]
    return Timing(_quantile(us, 0.5), _quantile(us, 0.25), _quantile(us, 0.75), len(us),
                  f"torch.utils.benchmark.Timer x{number}")


def time_gpu(fn: Callable, *args, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Time ``fn(*args)`` on CUDA: ``triton.testing.do_bench`` quartiles, else CUDA events."""
    call = (lambda: fn(*args)) if args else fn
    try:
        from triton.testing import do_bench

        q25, med, q75 = do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        n = max(1, int(rep_ms / max(med, 1e-6)))
        return Timing(med * 1e3, q25 * 1e3, q75 * 1e3, n, "triton.testing.do_bench")
    except ImportError:
        pass
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    times = []
    budget = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or time.perf_counter() < budget:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.25), _quantile(times, 0.75), len(times), "cuda events")


def time_fn(fn: Callable, *args, device="cpu", threads: Optional[int] = None, quick: bool = False,
            min_run_time: float = 0.2) -> Timing:
    """Time ``fn(*args)`` on ``device`` (CPU: with ``threads``); ``quick`` = one short measurement."""
    if torch.device(device).type == "cuda":
        return time_gpu(fn, *args, warmup_ms=1 if quick else 25, rep_ms=5 if quick else 100)
    if quick:
        return time_cpu(fn, *args, threads=threads, min_run_time=0.0, min_blocks=1, block_time=0.0, warmup=1)
    return time_cpu(fn, *args, threads=threads, min_run_time=min_run_time)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict, device="cpu", repeats: int = 15, budget_s: Optional[float] = None) -> dict:
    """Seconds of each call of each zero-argument function in ``fns``: name -> list of ``repeats``.

    Calls go round-robin (a, b, a, b, ...) so that machine noise hits every function alike, which
    is what makes their ratio trustworthy on a shared machine. Each function is called once first
    (warm-up). With ``budget_s``, ``repeats`` is cut so the timed rounds take about that long (at
    least 3 rounds).
    """
    with torch.inference_mode():
        one = 0.0
        for f in fns.values():
            f()
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            one += time.perf_counter() - t0
        if budget_s is not None:
            repeats = int(max(3, min(repeats, budget_s / max(one, 1e-9))))
        times = {k: [] for k in fns}
        for _ in range(max(1, repeats)):
            for k, f in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                f()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
    return times


def time_call(fn: Callable[[], object], device="cpu", repeats: int = 15, warmup: int = 2,
              min_seconds: float = 2e-4) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timed runs.

    Each run loops ``fn`` enough times to last about ``min_seconds`` (so timer resolution and
    Python overhead do not dominate fast layers).
    """
    with torch.no_grad():
        for _ in range(max(1, warmup)):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, min(1000, int(min_seconds / one)))
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)
