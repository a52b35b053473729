"""Per-call cost of the index checks (kernels/validate.py) on the eager batch-1 path.

Times, interleaved round by round (median of per-round per-call times):

* ``checked``: ``sparse_compile.kernels.condensed_linear`` as shipped (the O(1) cached check runs);
* ``unchecked``: the same wrapper with the check stubbed out (``validate.fast_ok`` -> True);
* ``check only``: ``validate.fast_ok(indices, width)`` alone.

    python bench/validate_overhead.py [--rounds 15] [--calls 2000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparse_compile  # noqa: F401
from sparse_compile.kernels import condensed_linear, ops, validate

LAYERS = [(256, 256, 26), (768, 3072, 77), (3072, 768, 307)]  # (in, out, k): 90 % sparse fan-in


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> None:
    """Print a table of per-call times (us) and the check's share of the checked call."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    real_fast_ok = validate.fast_ok
    print(f"torch {torch.__version__}, 1 thread, batch 1, fp32; median of {args.rounds} interleaved rounds "
          f"x {args.calls} calls")
    print(f"{'layer (in->out, k)':<22}{'checked us':>12}{'unchecked us':>14}{'check only us':>15}{'overhead':>10}")
    for fan_in, n, k in LAYERS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, fan_in, generator=g)
        v = torch.randn(n, k, generator=g)
        i = torch.stack([torch.randperm(fan_in, generator=g)[:k] for _ in range(n)]).to(torch.int32)
        with torch.no_grad():
            condensed_linear(x, v, i)  # builds / loads the C++ op, fills the index cache
            res = {"checked": [], "unchecked": [], "check": []}
            for r in range(args.rounds):
                # Alternate which variant goes first: the second of a pair runs on warmer caches.
                for variant in (("checked", "unchecked") if r % 2 == 0 else ("unchecked", "checked")):
                    # the wrapper reads fast_ok through the module, so patching it there stubs the check
                    ops.validate.fast_ok = real_fast_ok if variant == "checked" else (lambda idx, w: True)
                    res[variant].append(_per_call_us(lambda: condensed_linear(x, v, i), args.calls))
                validate.fast_ok = real_fast_ok
                res["check"].append(_per_call_us(lambda: real_fast_ok(i, fan_in), args.calls * 5))
        validate.fast_ok = real_fast_ok
        c, u, o = (statistics.median(res[key]) for key in ("checked", "unchecked", "check"))
        print(f"{f'{fan_in}->{n}, k={k}':<22}{c:>12.2f}{u:>14.2f}{o:>15.3f}{(c / u - 1) * 100:>9.1f}%")


if __name__ == "__main__":
    main()
