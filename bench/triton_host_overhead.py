"""Host (Python) overhead of one eager call of the condensed Triton linear, launches stubbed.

    python -m bench.triton_host_overhead            # runs on CPU, no GPU needed
    python -m bench.triton_host_overhead --reps 2000

Everything up to the kernel launch runs for real (argument checks, config choice, the autotuner's
cache lookup, allocations, the to-feature-major decision, the torch op dispatch), on CPU tensors;
``JITFunction.run`` (triton's own binder and the driver launch) is replaced by a stub that only
evaluates the grid. So the figures are *our* cost per call; triton's launch path comes on top
(gpu_check measures the whole eager call on a GPU). Rows:

* ``launcher``: ``kernels.triton_linear.condensed_linear_triton`` called directly.
* ``public wrapper``: ``sparse_compile.kernels.condensed_linear`` (argument checks, plain-eager
  test, then the launcher), as a CUDA call takes it.
* ``torch.ops``: ``torch.ops.sparse_compile.condensed_linear`` under ``torch.no_grad`` (custom-op
  dispatch, then the launcher).
* ``launcher, forced wrap_triton``: every launch through ``torch.library.wrap_triton``'s eager path,
  i.e. what each eager call cost before launches went direct outside tracing.

Layer: ViT-B/16 fc2 (768 x 3072) at 90% sparsity (k = 307), batch 1 and 256. Medians (and minima) of interleaved rounds, microseconds per call: on a shared machine the
minimum is the closer estimate of an idle core.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions: the interpreter has its own costs

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import sparse_compile.kernels as K  # noqa: E402
from sparse_compile.kernels import ops  # noqa: E402
from sparse_compile.kernels import triton_launch as tlaunch  # noqa: E402
from sparse_compile.kernels import triton_linear as tlin  # noqa: E402

N_OUT, FAN_IN, SPARSITY = 768, 3072, 0.9


def stub_launches() -> list:
    """Replace triton's launch with a grid evaluation and let the CPU tensors through the
    launchers' device check; returns the launches seen (kernel name, grid), for a sanity print."""
    seen = []

    def run(self, *args, grid, warmup=False, **kwargs):
        g = grid(kwargs) if callable(grid) else grid  # our grids read only the config's block sizes
        seen.append((self.__name__, tuple(g)))

    def bench(self, *args, config, **meta):
        return [1.0, 1.0, 1.0]

    def no_disk_cache(self, key, configs, bench_fn):
        bench_fn()
        return False

    JITFunction.run = run
    Autotuner._bench = bench
    Autotuner.check_disk_cache = no_disk_cache
    tlin._runs_here = lambda device: True
    # Route the two public entries' CPU branches to the Triton launcher (their CUDA branch).
    ops._CPU_OP = tlin.condensed_linear_triton
    ops._linear_impl = lambda x, v, i, b: tlin.condensed_linear_triton(x, v, i, b)
    return seen


def per_call_us(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e6 * (time.perf_counter() - t) / reps


def main(argv=None) -> None:
    """Print the per-call host overhead table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=500, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    args = ap.parse_args(argv)
    seen = stub_launches()
    torch.manual_seed(0)
    k = round(FAN_IN * (1 - SPARSITY))
    idx = torch.rand(N_OUT, FAN_IN).argsort(1)[:, :k].sort(1).values.to(torch.int16)
    vals = torch.randn(N_OUT, k)
    real_tracing = tlin.tracing
    rows = {}
    for batch in (1, 256):
        x = torch.randn(batch, FAN_IN)

        def forced(x=x):
            tlaunch.tracing = tlin.tracing = lambda t: True
            try:
                tlin.condensed_linear_triton(x, vals, idx)
            finally:
                tlaunch.tracing = tlin.tracing = real_tracing

        def op(x=x):
            with torch.no_grad():
                torch.ops.sparse_compile.condensed_linear(x, vals, idx, None)

        fns = {"launcher": lambda x=x: tlin.condensed_linear_triton(x, vals, idx),
               "public wrapper": lambda x=x: K.condensed_linear(x, vals, idx),
               "torch.ops (no_grad)": op,
               "launcher, forced wrap_triton": forced}
        for f in fns.values():
            f()  # first call: autotuner bookkeeping, caches
        seen.clear()
        fns["launcher"]()
        launches = list(seen)
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, f in fns.items():
                reps = max(1, args.reps // 20) if "forced" in name else args.reps
                times[name].append(per_call_us(f, reps))
        rows[batch] = ({n: (statistics.median(t), min(t)) for n, t in times.items()}, launches)
    print(f"host overhead per eager call, launches stubbed (us; median of {args.rounds} interleaved rounds); "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"layer {N_OUT}x{FAN_IN}, sparsity {SPARSITY}, k={k}")
    names = list(rows[1][0])
    print(f"  {'entry':32s} " + " ".join(f"{'B=' + str(b) + ' median':>13s} {'(min)':>7s}" for b in rows))
    for name in names:
        print(f"  {name:32s} " + " ".join(f"{rows[b][0][name][0]:13.1f} {rows[b][0][name][1]:7.1f}" for b in rows))
    for b, (_, launches) in rows.items():
        print(f"  launches per call at B={b}: " + ", ".join(f"{n}{g}" for n, g in launches))


if __name__ == "__main__":
    main()
