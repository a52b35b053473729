"""One-shot GPU check of the condensed kernels: correctness, then like-for-like timings.

    python -m bench.gpu_check            # on a CUDA machine; installs nothing, < 4 minutes
    python -m bench.gpu_check --dry-run  # anywhere: prints every row it will measure and runs
                                         # each callable once on CPU (Triton interpreter, tiny
                                         # shapes): checks the script, not speed

Layer: ViT-B/16 MLP fc2, weight 768 x 3072 (out x in), constant fan-in with random sorted int16
indices, no bias. Every case (dtype, sparsity, batch) is measured three ways, and each way is
compared only with itself:

* ``kernel``: GPU time of one call, captured in a CUDA graph (no host overhead) and replayed after
  an L2 flush (a 256 MB memset) each time; median of CUDA-event timings. Where capture fails
  (cuSPARSE may refuse), events around the plain call, marked ``*``.
* ``eager``: wall time per call of back-to-back calls, synchronised at the end (host overhead
  included, L2 warm): what a Python loop over the layer sees.
* ``compiled``: the same wall time for ``torch.compile`` (default mode) of the layer, dense
  ``F.linear`` against ``torch.ops.sparse_compile.condensed_linear``; a few cases only (each
  compile costs seconds).

Columns: dense fp32 (TF32 off), dense TF32, dense bf16 (cuBLAS), torch CSR fp32 (cuSPARSE), ``cond``
the Triton launcher ``condensed_linear_triton`` (auto kernel choice), ``op`` the public op
``torch.ops.sparse_compile.condensed_linear``, ``wrap`` the Python wrapper
``sparse_compile.kernels.condensed_linear`` that the layers call, ``floor`` the L1 floor (``n*k*B``
gathered elements at 32 fp32 per clock per SM). Targets are judged on each way separately
(``kernel``: cond vs the baseline's kernel; ``eager``: wrap vs the baseline's call; ``compiled``:
compiled op vs compiled baseline). With ``$OUT`` set, results also go to ``$OUT/gpu_check.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

T0 = time.time()
BUDGET_S = 200.0  # stop starting new sections after this; the whole script must stay < 4 min
COMPILE_BEFORE_S = 150.0  # start no torch.compile after this
DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    os.environ.setdefault("SPARSE_COMPILE_NO_CPP", "1")  # the op's CPU path: no C++ build here

import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_compile.numerics import relative_error as rel_err  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message=".*C\\+\\+ kernels.*")

RESULTS = {"header": {}, "correctness": [], "timings": [], "targets": [], "configs": {}, "errors": []}
DEV = "cpu" if DRY else "cuda"
N_OUT, FAN_IN = (24, 200) if DRY else (768, 3072)
MID, LARGE = (20, 40) if DRY else (256, 2048)
# (dtype, sparsity, batch, compiled?)
CASES = [("fp32", 0.9, 1, True), ("fp32", 0.9, MID, True), ("fp32", 0.9, LARGE, False),
         ("fp32", 0.99, 1, False), ("fp32", 0.99, MID, False), ("fp32", 0.99, LARGE, False),
         ("bf16", 0.99, MID, True), ("bf16", 0.9, MID, False), ("bf16", 0.9, 1, False)]
KINDS = ("kernel", "eager", "compiled")
COLS = ("dense32", "tf32", "bf16", "csr32", "cond", "op", "wrap")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# name, case (dtype, sparsity, batch), baseline column, wanted ratio (> 1.0 means at least, 1.0 faster)
TARGETS = [("fp32 90% B=1: >= 1.7x dense F.linear", ("fp32", 0.9, 1), "dense32", 1.7),
           (f"fp32 90% B={MID}: >= 2.0x cuBLAS fp32", ("fp32", 0.9, MID), "dense32", 2.0),
           (f"fp32 90% B={MID}: >= 3.0x torch CSR", ("fp32", 0.9, MID), "csr32", 3.0),
           (f"fp32 90% B={LARGE}: >= 2.0x dense", ("fp32", 0.9, LARGE), "dense32", 2.0),
           (f"bf16 99% B={MID}: faster than dense bf16", ("bf16", 0.99, MID), "bf16", 1.0)]
# Which of our columns stands for "the condensed layer" in each way of measuring.
OURS = {"kernel": "cond", "eager": "wrap", "compiled": "op"}


def elapsed() -> float:
    return time.time() - T0


def guarded(name):
    """Run a section; record (and print) its exception instead of stopping the script."""

    def deco(fn):
        def run(*a, **kw):
            if elapsed() > BUDGET_S:
                RESULTS["errors"].append(f"{name}: skipped (time budget)")
                print(f"  [{name}] skipped: time budget")
                return None
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - one failure must not kill the table
                msg = f"{name}: {type(e).__name__}: {e}".splitlines()[0][:300]
                RESULTS["errors"].append(msg)
                print(f"  [{name}] FAILED: {msg}")
                traceback.print_exc(limit=3, file=sys.stderr)
                return None

        return run

    return deco


def set_tf32(on: bool) -> None:
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        mm.fp32_precision = "tf32" if on else "ieee"
    else:
        mm.allow_tf32 = on


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------
_FLUSH = []


def kernel_us(fn, reps: int = 40):
    """(median GPU microseconds of one call, how): a CUDA graph of ``fn`` replayed after an L2
    flush each time ("graph"), or CUDA events around the plain call where capture fails
    ("events"). In a dry run: one timed CPU call ("dry")."""
    if DRY:
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t), "dry"
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device=DEV))
    flush = _FLUSH[0]
    fn()
    torch.cuda.synchronize()
    how, replay = "graph", fn
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        replay = g.replay
    except Exception:  # noqa: BLE001 - some libraries refuse capture; time them plainly
        how, replay = "events", fn
        torch.cuda.synchronize()
    for _ in range(3):
        flush.zero_()
        replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        flush.zero_()
        s.record()
        replay()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in ev), how


def wall_us(fn, reps: int = 100, rounds: int = 3) -> float:
    """Median over ``rounds`` of the wall time per call of ``reps`` back-to-back calls."""
    if DRY:
        reps, rounds = 1, 1
    fn()
    sync = torch.cuda.synchronize if not DRY else (lambda: None)
    sync()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        out.append(1e6 * (time.perf_counter() - t) / reps)
    return statistics.median(out)


# ---------------------------------------------------------------------------------------------
def make_layer(sparsity: float, dtype=torch.float32):
    k = max(1, round(FAN_IN * (1 - sparsity)))
    g = torch.Generator(device=DEV).manual_seed(0)
    idx = torch.rand(N_OUT, FAN_IN, device=DEV, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values
    vals = torch.randn(N_OUT, k, device=DEV, generator=g).to(dtype)
    dense = torch.zeros(N_OUT, FAN_IN, device=DEV, dtype=dtype).scatter_(1, idx, vals)
    return vals, idx.to(torch.int16), dense


@guarded("header")
def header():
    import triton

    if DRY:
        h = dict(device="cpu (dry run: TRITON_INTERPRET=1, tiny shapes, no timings worth reading)", sms=132,
                 clock_mhz=1980.0, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, l2_mb=0)
    else:
        p = torch.cuda.get_device_properties(0)
        clock_khz = getattr(p, "clock_rate", 0) or 1_980_000  # H100/H200 boost clock if not reported
        h = dict(device=p.name, sms=p.multi_processor_count, clock_mhz=clock_khz / 1e3, torch=torch.__version__,
                 triton=triton.__version__, cuda=torch.version.cuda,
                 l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    RESULTS["header"] = h
    print(f"sparse_compile gpu_check: {h['device']} ({h['sms']} SMs, {h['clock_mhz']:.0f} MHz, L2 {h['l2_mb']} MB), "
          f"torch {h['torch']}, triton {h['triton']}, CUDA {h['cuda']}")


def l1_floor_us(k: int, batch: int) -> float:
    h = RESULTS["header"] or {"sms": 132, "clock_mhz": 1980}
    return N_OUT * k * batch / (h["sms"] * 32 * h["clock_mhz"] * 1e6) * 1e6


# ---------------------------------------------------------------------------------------------
@guarded("correctness")
def correctness(tlin, tconv):
    print("correctness (max |err| / max |ref| vs a float64 reference; fp32 < 1e-5, bf16 < 1e-2):")
    cases = [(s, b, torch.float32, {}) for s in (0.9, 0.99) for b in (1, MID, LARGE)]
    cases += [(0.99, MID, torch.bfloat16, {}), (0.9, 1, torch.bfloat16, {}),
              (0.9, 16, torch.float32, dict(kernel="gemv")), (0.9, 17, torch.float32, dict(kernel="batched"))]
    layers = {}
    for sp, batch, dtype, kw in cases:
        if (sp, dtype) not in layers:
            layers[(sp, dtype)] = make_layer(sp, dtype)
        vals, idx, dense = layers[(sp, dtype)]
        bias = torch.randn(2 * N_OUT, device=DEV).to(dtype)[::2]  # strided: the launcher must honour it
        x = torch.randn(batch, FAN_IN, device=DEV).to(dtype)
        y = tlin.condensed_linear_triton(x, vals, idx, bias, **kw)
        ref = x.double() @ dense.double().t() + bias.double()
        err = rel_err(y, ref)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        ok = bool(err < tol and not torch.isnan(y).any())
        name = f"linear {str(dtype)[6:]} {sp:.2f} B={batch} {kw or ''}".strip()
        RESULTS["correctness"].append(dict(case=name, max_rel_err=err, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {name:48s} {err:.1e}")
    pinned = tconv.conv_configs()[0]
    convs = (((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((1, 1), 1, 0, 1), ((3, 3), 1, 2, 2))
    for i, (ks, st, pd, dl) in enumerate(convs):
        c, o, hw = (4, 6, 7) if DRY else (64, 128, 28)
        fan = c * ks[0] * ks[1]
        k = max(1, fan // 10)
        idx = torch.rand(o, fan, device=DEV).argsort(1)[:, :k].sort(1).values
        vals = torch.randn(o, k, device=DEV)
        w = torch.zeros(o, fan, device=DEV).scatter_(1, idx, vals).reshape(o, c, *ks)
        x = torch.randn(2, c, hw, hw, device=DEV)
        # Only the first case autotunes: each kernel size is its own compile.
        y = tconv.condensed_conv2d_triton(x, vals, idx.to(torch.int16), None, ks, st, pd, dl,
                                          config=None if i == 0 else pinned)
        err = rel_err(y, F.conv2d(x.double(), w.double(), None, st, pd, dl))
        ok = err < 1e-5
        name = f"conv2d fp32 k{ks[0]}x{ks[1]} s{st} p{pd} d{dl}"
        RESULTS["correctness"].append(dict(case=name, max_rel_err=err, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {name:48s} {err:.1e}")
    op = torch.ops.sparse_compile.condensed_linear
    vals, idx, dense = layers[(0.9, torch.float32)]
    x = torch.randn(MID, FAN_IN, device=DEV)
    err = rel_err(op(x, vals, idx, None), x.double() @ dense.double().t())
    name = f"torch.ops.sparse_compile.condensed_linear 0.90 B={MID}"
    RESULTS["correctness"].append(dict(case=name, max_rel_err=err, ok=err < 1e-5))
    print(f"  {'ok  ' if err < 1e-5 else 'FAIL'} {name:48s} {err:.1e}")


# ---------------------------------------------------------------------------------------------
def case_fns(tlin, dtype: str, sp: float, batch: int):
    """{column: callable} for one case (plain eager callables), and k."""
    from sparse_compile.kernels import condensed_linear as wrapper

    dt = DTYPES[dtype]
    vals, idx, dense = make_layer(sp, dt)
    x = torch.randn(batch, FAN_IN, device=DEV).to(dt)
    op = torch.ops.sparse_compile.condensed_linear
    fns = {}
    if dtype == "fp32":
        fns["dense32"] = ("ieee", lambda: F.linear(x, dense))
        fns["tf32"] = ("tf32", lambda: F.linear(x, dense))
        csr = dense.to_sparse_csr()
        fns["csr32"] = ("ieee", lambda: torch.mm(csr, x.t()))
    else:
        fns["bf16"] = ("ieee", lambda: F.linear(x, dense))
    fns["cond"] = ("ieee", lambda: tlin.condensed_linear_triton(x, vals, idx))
    fns["op"] = ("ieee", lambda: op(x, vals, idx, None))
    fns["wrap"] = ("ieee", lambda: wrapper(x, vals, idx))
    compiled = {"dense32" if dtype == "fp32" else "bf16": (lambda t: F.linear(t, dense)),
                "op": (lambda t: op(t, vals, idx, None))}
    return fns, compiled, x, vals.shape[1]


def plan():
    """Every (case, way, column) row the run will measure; printed before measuring."""
    rows = []
    for dtype, sp, batch, comp in CASES:
        cols = ["dense32", "tf32", "csr32"] if dtype == "fp32" else ["bf16"]
        cols += ["cond", "op", "wrap"]
        rows.append((dtype, sp, batch, "kernel", [c for c in cols if c not in ("op", "wrap")]))
        rows.append((dtype, sp, batch, "eager", cols))
        if comp:
            rows.append((dtype, sp, batch, "compiled", [cols[0], "op"]))
    return rows


@guarded("timings")
def timings(tlin):
    rows = plan()
    print(f"\nplan: {len(rows)} rows (case, way: columns)")
    for dtype, sp, batch, kind, cols in rows:
        print(f"  {dtype} {sp:.2f} B={batch:<5d} {kind:8s}: {' '.join(cols)}")
    for dtype, sp, batch, comp in CASES:
        if elapsed() > BUDGET_S:
            RESULTS["errors"].append(f"timings {dtype} {sp} B={batch}: skipped (time budget)")
            continue
        fns, compiled, x, k = case_fns(tlin, dtype, sp, batch)
        base = dict(dtype=dtype, sparsity=sp, batch=batch, k=k, floor=l1_floor_us(k, batch))
        kern, eager, comp_row = dict(base, kind="kernel"), dict(base, kind="eager"), dict(base, kind="compiled")
        for col, (prec, fn) in fns.items():
            if not DRY:
                set_tf32(prec == "tf32")
            try:
                if col not in ("op", "wrap"):
                    kern[col], how = kernel_us(fn)
                    if how == "events":
                        kern.setdefault("events", []).append(col)
                eager[col] = wall_us(fn)
            except Exception as e:  # noqa: BLE001
                RESULTS["errors"].append(f"{dtype} {sp} B={batch} {col}: {type(e).__name__}: {e}"[:300])
        if not DRY:
            set_tf32(False)
        RESULTS["timings"] += [kern, eager]
        if comp and elapsed() < COMPILE_BEFORE_S:
            for col, f in compiled.items():
                try:
                    cf = torch.compile(f, backend="eager" if DRY else "inductor", fullgraph=True)
                    comp_row[col] = wall_us(lambda cf=cf: cf(x))
                except Exception as e:  # noqa: BLE001
                    RESULTS["errors"].append(f"compiled {dtype} {sp} B={batch} {col}: {type(e).__name__}: {e}"[:300])
            RESULTS["timings"].append(comp_row)
        elif comp:
            RESULTS["errors"].append(f"compiled {dtype} {sp} B={batch}: skipped (compile budget)")


def print_table():
    print("\ntimings (median us; kernel: CUDA graph, L2 flushed [* = events, no graph]; eager/compiled: wall "
          "per call, back to back)")
    print(f"  {'case':18s} {'way':8s} " + " ".join(f"{c:>8s}" for c in COLS) + f" {'floor':>7s} {'vs dense':>8s}"
          + f" {'vs csr':>7s}")
    for r in RESULTS["timings"]:
        ev = r.get("events", [])
        cells = " ".join((f"{r[c]:7.1f}{'*' if c in ev else ' '}" if c in r else f"{'-':>8s}") for c in COLS)
        ours = r.get(OURS[r["kind"]])
        basec = "dense32" if r["dtype"] == "fp32" else "bf16"
        vs = f"{r[basec] / ours:7.2f}x" if ours and r.get(basec) else f"{'-':>8s}"
        vc = f"{r['csr32'] / ours:6.2f}x" if ours and r.get("csr32") else f"{'-':>7s}"
        case = f"{r['dtype']} {r['sparsity']:.2f} B={r['batch']}"
        print(f"  {case:18s} {r['kind']:8s} {cells} {r['floor']:7.1f} {vs} {vc}")


def check_targets():
    print("\ntargets (same-run ratios, each way against itself; ours = kernel: cond, eager: wrap, compiled: op):")
    for name, (dtype, sp, batch), base, want in TARGETS:
        parts = []
        for kind in KINDS:
            row = next((r for r in RESULTS["timings"] if (r["dtype"], r["sparsity"], r["batch"], r["kind"])
                        == (dtype, sp, batch, kind)), {})
            ours = row.get(OURS[kind])
            if not ours or not row.get(base):
                continue
            got = row[base] / ours
            ok = got >= want if want > 1.0 else got > want
            star = "*" if base in row.get("events", []) else ""
            verdict = "dry" if DRY else ("PASS" if ok else "MISS")  # CPU timings judge nothing
            parts.append(f"{kind} {verdict} {got:.2f}x{star}")
            RESULTS["targets"].append(dict(target=name, way=kind, ratio=got, want=want, ok=ok))
        print(f"  {name:42s} " + ("  ".join(parts) if parts else "not measured"))


def record_configs(tlin):
    try:
        for key, cfg in tlin._BEST.items():
            RESULTS["configs"][str(key)] = str(cfg)
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"].append(f"configs: {e}")
    if RESULTS["configs"]:
        print("\nautotuned configs:")
        for k, v in RESULTS["configs"].items():
            print(f"  {k}: {v}")


def main() -> int:
    if not DRY and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to check the script on CPU)")
        return 1
    torch.manual_seed(0)
    header()
    import sparse_compile.kernels  # noqa: F401  (registers torch.ops.sparse_compile.*)
    from sparse_compile.kernels import triton_conv as tconv
    from sparse_compile.kernels import triton_linear as tlin

    correctness(tlin, tconv)
    timings(tlin)
    print_table()
    check_targets()
    record_configs(tlin)
    if RESULTS["errors"]:
        print("\nerrors / skips:")
        for e in RESULTS["errors"]:
            print(f"  {e}")
    RESULTS["header"]["wall_s"] = round(elapsed(), 1)
    print(f"\ntotal {elapsed():.0f} s")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
