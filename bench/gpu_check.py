"""One-shot GPU check of the condensed kernels: correctness and timings in one table.

    python bench/gpu_check.py            # on the device machine; installs nothing, < 4 minutes
    python bench/gpu_check.py --dry-run  # anywhere: every section on CPU through the Triton
                                         # interpreter, tiny shapes (checks the script, not speed)

Layer: ViT-B/16 MLP fc2, weight 768 x 3072 (out x in), constant fan-in with random sorted
indices (int16), no bias in the timings. Timings are medians of ``triton.testing.do_bench``
(L2 flushed before every call), in microseconds; ratios are taken within this run. Every section
is guarded: a failure is recorded and the table goes on. With ``$OUT`` set, the results are also
written to ``$OUT/gpu_check.json``.

Columns: dense fp32 (TF32 off), dense TF32, dense bf16 (F.linear, cuBLAS), torch CSR fp32
(cuSPARSE), the condensed Triton launcher (auto kernel choice), the op
``torch.ops.sparse_compile.condensed_linear`` eagerly and under
``torch.compile(mode="max-autotune")``, the copy to feature-major alone, and the L1 floor:
``n*k*B`` gathered elements at 32 fp32 per clock per SM (the anchors' arithmetic).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

T0 = time.time()
BUDGET_S = 215.0  # stop starting new sections after this; the whole script must stay < 4 min
COMPILE_BEFORE_S = 140.0  # torch.compile(max-autotune) takes tens of seconds: only start it early
DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

RESULTS = {"header": {}, "correctness": [], "timings": [], "targets": [], "configs": {}, "errors": []}
DEV = "cpu" if DRY else "cuda"
N_OUT, FAN_IN = (24, 200) if DRY else (768, 3072)
SPARSITIES = (0.9, 0.99)
BATCHES = (1, 20, 40) if DRY else (1, 256, 2048)
MID, LARGE = BATCHES[1], BATCHES[2]


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


def bench(fn) -> float:
    """Median microseconds; short runs keep the whole script inside its budget."""
    if DRY:
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e6 * sorted(ts)[1]
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def make_layer(sparsity: float, dtype=torch.float32):
    k = max(1, round(FAN_IN * (1 - sparsity)))
    g = torch.Generator(device=DEV).manual_seed(0)
    idx = torch.rand(N_OUT, FAN_IN, device=DEV, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values
    vals = torch.randn(N_OUT, k, device=DEV, generator=g).to(dtype)
    dense = torch.zeros(N_OUT, FAN_IN, device=DEV, dtype=dtype).scatter_(1, idx, vals)
    return vals, idx.to(torch.int16), dense


def rel_err(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------
@guarded("header")
def header():
    import triton

    if DRY:
        h = dict(device="cpu (dry run: TRITON_INTERPRET=1, tiny shapes)", sms=132, clock_mhz=1980.0,
                 torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, l2_mb=0)
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
    print("correctness (max |err| / max |ref| vs a float64 reference; fp32 < 1e-5, bf16/fp16 < 1e-2):")
    cases = [(s, b, torch.float32, {}) for s in SPARSITIES for b in BATCHES]
    cases += [(0.99, MID, torch.bfloat16, {}), (0.9, MID, torch.bfloat16, {}), (0.9, 1, torch.bfloat16, {}),
              (0.9, 16, torch.float32, dict(kernel="gemv")), (0.9, 17, torch.float32, dict(kernel="batched")),
              (0.9, MID, torch.float32, dict(split_k=1)), (0.9, MID, torch.float32, dict(split_k=4))]
    layers = {}
    for sp, batch, dtype, kw in cases:
        if (sp, dtype) not in layers:
            layers[(sp, dtype)] = make_layer(sp, dtype)
        vals, idx, dense = layers[(sp, dtype)]
        bias = torch.randn(N_OUT, device=DEV).to(dtype)
        x = torch.randn(batch, FAN_IN, device=DEV).to(dtype)
        y = tlin.condensed_linear_triton(x, vals, idx, bias, **kw)
        ref = x.double() @ dense.double().t() + bias.double()
        err = rel_err(y, ref)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        ok = bool(err < tol and not torch.isnan(y).any())
        name = f"linear {str(dtype)[6:]} {sp:.2f} B={batch} {kw or ''}".strip()
        RESULTS["correctness"].append(dict(case=name, max_rel_err=err, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {name:48s} {err:.1e}")
    # conv: stride / padding / dilation against F.conv2d with the masked dense weight. Only the
    # first case autotunes: each kernel size / unit stride / unit dilation is its own compile.
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
        y = tconv.condensed_conv2d_triton(x, vals, idx.to(torch.int16), None, ks, st, pd, dl,
                                          config=None if i == 0 else pinned)
        err = rel_err(y, F.conv2d(x.double(), w.double(), None, st, pd, dl))
        ok = err < 1e-5
        name = f"conv2d fp32 k{ks[0]}x{ks[1]} s{st} p{pd} d{dl}"
        RESULTS["correctness"].append(dict(case=name, max_rel_err=err, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {name:48s} {err:.1e}")


@guarded("op correctness")
def op_correctness():
    op = getattr(getattr(torch.ops, "sparse_compile", None), "condensed_linear", None)
    if op is None:
        RESULTS["errors"].append("torch.ops.sparse_compile.condensed_linear not registered")
        return
    vals, idx, dense = make_layer(0.9)
    x = torch.randn(MID, FAN_IN, device=DEV)
    err = rel_err(op(x, vals, idx, None), x.double() @ dense.double().t())
    ok = err < 1e-5
    name = f"torch.ops.sparse_compile.condensed_linear 0.90 B={MID}"
    RESULTS["correctness"].append(dict(case=name, max_rel_err=err, ok=ok))
    print(f"  {'ok  ' if ok else 'FAIL'} {name:48s} {err:.1e}")


# ---------------------------------------------------------------------------------------------
def timing_row(tlin, sp, batch, compiled):
    row = {"sparsity": sp, "batch": batch}
    vals, idx, dense = make_layer(sp)
    k = vals.shape[1]
    x = torch.randn(batch, FAN_IN, device=DEV)
    row["k"] = k
    row["l1_floor"] = l1_floor_us(k, batch)

    def put(name, fn):
        if elapsed() > BUDGET_S:
            return
        try:
            fn()  # first call: compile / autotune outside the timed region
            row[name] = bench(fn)
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"{name} sparsity {sp} batch {batch}: {type(e).__name__}: {e}"[:300])

    set_tf32(False)
    put("dense_fp32", lambda: F.linear(x, dense))
    set_tf32(True)
    put("dense_tf32", lambda: F.linear(x, dense))
    set_tf32(False)
    xb, db = x.bfloat16(), dense.bfloat16()
    put("dense_bf16", lambda: F.linear(xb, db))
    csr = dense.to_sparse_csr()
    put("csr_fp32", lambda: torch.mm(csr, x.t()))
    put("condensed", lambda: tlin.condensed_linear_triton(x, vals, idx))
    if batch > tlin.GEMV_MAX_BATCH:
        put("condensed_split1", lambda: tlin.condensed_linear_triton(x, vals, idx, split_k=1))
        put("to_feature_major", lambda: tlin.to_feature_major(x))
    op = getattr(getattr(torch.ops, "sparse_compile", None), "condensed_linear", None)
    if op is not None:
        put("op_eager", lambda: op(x, vals, idx, None))
        if compiled and not DRY and elapsed() < COMPILE_BEFORE_S:
            f = torch.compile(lambda t: op(t, vals, idx, None), mode="max-autotune", fullgraph=True)
            put("op_compiled", lambda: f(x))
    return row


@guarded("timings")
def timings(tlin):
    compiled_for = {(0.9, 1), (0.9, MID)}
    for sp in SPARSITIES:
        for batch in BATCHES:
            if elapsed() > BUDGET_S:
                RESULTS["errors"].append(f"timings sparsity {sp} batch {batch}: skipped (time budget)")
                continue
            RESULTS["timings"].append(timing_row(tlin, sp, batch, (sp, batch) in compiled_for))
    # bf16 at 99% / 256 (target: faster than dense bf16) and at 90% / 256
    for sp in (0.99, 0.9):
        vals, idx, dense = make_layer(sp, torch.bfloat16)
        x = torch.randn(MID, FAN_IN, device=DEV, dtype=torch.bfloat16)
        row = {"sparsity": sp, "batch": MID, "dtype": "bf16", "k": vals.shape[1]}
        row["dense_bf16"] = bench(lambda: F.linear(x, dense))
        tlin.condensed_linear_triton(x, vals, idx)
        row["condensed"] = bench(lambda: tlin.condensed_linear_triton(x, vals, idx))
        if sp == 0.99:  # one launch, no transpose: the alternative when the work is this small
            tlin.condensed_linear_triton(x, vals, idx, kernel="gemv")
            row["condensed_gemv"] = bench(lambda: tlin.condensed_linear_triton(x, vals, idx, kernel="gemv"))
        RESULTS["timings"].append(row)


@guarded("split sweep")
def split_sweep(tlin):
    """fp32 90% at the mid batch across fan-in splits: the data for tuning the split heuristic."""
    vals, idx, _ = make_layer(0.9)
    x = torch.randn(MID, FAN_IN, device=DEV)
    out = {}
    for s in (1, 2, 3, 4, 6, 8):
        if elapsed() > BUDGET_S:
            break
        tlin.condensed_linear_triton(x, vals, idx, split_k=s)
        out[s] = bench(lambda: tlin.condensed_linear_triton(x, vals, idx, split_k=s))
    RESULTS["split_sweep_90_mid"] = out
    print(f"split sweep, fp32 0.90 B={MID} (us): " + "  ".join(f"S={s}: {t:.1f}" for s, t in out.items()))


@guarded("cuda graph")
def cuda_graph(tlin):
    """Batch 1 with launch overhead removed (the anchors' 'GEMV in a CUDA graph' row)."""
    import triton.testing

    if DRY:
        return
    vals, idx, dense = make_layer(0.9)
    x = torch.randn(1, FAN_IN, device=DEV)
    set_tf32(False)
    tlin.condensed_linear_triton(x, vals, idx)
    res = {}
    for name, fn in (("dense_fp32", lambda: F.linear(x, dense)),
                     ("condensed", lambda: tlin.condensed_linear_triton(x, vals, idx))):
        res[name] = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    RESULTS["cuda_graph_90_b1"] = res
    print(f"CUDA graph, fp32 0.90 B=1 (us): dense {res['dense_fp32']:.2f}  condensed {res['condensed']:.2f}  "
          f"ratio {res['dense_fp32'] / res['condensed']:.2f}x")


# ---------------------------------------------------------------------------------------------
def print_table():
    cols = ["dense_fp32", "dense_tf32", "dense_bf16", "csr_fp32", "condensed", "condensed_split1",
            "condensed_gemv", "op_eager", "op_compiled", "to_feature_major", "l1_floor"]
    short = ["dense32", "tf32", "bf16", "csr32", "cond", "cond_S1", "cond_gemv", "op", "op_comp", "xpose",
             "floor"]
    print("\ntimings (median us, L2 flushed; cond = condensed Triton, auto kernel):")
    print(f"  {'dtype':5s} {'spars':>5s} {'B':>5s} " + " ".join(f"{c:>9s}" for c in short)
          + f" {'dense/cond':>10s} {'csr/cond':>8s}")
    for r in RESULTS["timings"]:
        cells = " ".join(f"{r[c]:9.1f}" if c in r else f"{'-':>9s}" for c in cols)
        base = r.get("dense_fp32") if r.get("dtype", "fp32") == "fp32" else r.get("dense_bf16")
        ratio = f"{base / r['condensed']:10.2f}" if base and r.get("condensed") else f"{'-':>10s}"
        cr = f"{r['csr_fp32'] / r['condensed']:8.2f}" if r.get("csr_fp32") and r.get("condensed") else f"{'-':>8s}"
        print(f"  {r.get('dtype', 'fp32'):5s} {r['sparsity']:5.2f} {r['batch']:5d} {cells} {ratio} {cr}")


def check_targets():
    def find(sp, b, dtype="fp32"):
        for r in RESULTS["timings"]:
            if r["sparsity"] == sp and r["batch"] == b and r.get("dtype", "fp32") == dtype:
                return r
        return {}

    specs = [("fp32 90% B=1: >= 1.7x dense F.linear", find(0.9, 1), "dense_fp32", 1.7),
             (f"fp32 90% B={MID}: >= 2.0x cuBLAS fp32", find(0.9, MID), "dense_fp32", 2.0),
             (f"fp32 90% B={MID}: >= 3.0x torch CSR", find(0.9, MID), "csr_fp32", 3.0),
             (f"fp32 90% B={LARGE}: >= 2.0x dense", find(0.9, LARGE), "dense_fp32", 2.0),
             (f"bf16 99% B={MID}: faster than dense bf16", find(0.99, MID, "bf16"), "dense_bf16", 1.0)]
    print("\ntargets (same-run ratios):")
    for name, row, base, want in specs:
        if base in row and "condensed" in row:
            got = row[base] / row["condensed"]
            ok = got >= want if want > 1.0 else got > want
            floor = row.get("l1_floor")
            extra = f"  (cond {row['condensed']:.1f} us, L1 floor {floor:.1f} us)" if floor else ""
            print(f"  [{'PASS' if ok else 'MISS'}] {name}: {got:.2f}x{extra}")
            RESULTS["targets"].append(dict(target=name, ratio=got, want=want, ok=ok))
        else:
            print(f"  [ -- ] {name}: not measured")
            RESULTS["targets"].append(dict(target=name, ratio=None, want=want, ok=None))


def record_configs(tlin):
    try:
        for tag, tuner in tlin._TUNERS.items():
            for key, cfg in getattr(tuner, "cache", {}).items():
                RESULTS["configs"][f"{tag} {key}"] = str(cfg)
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
    try:
        import sparse_compile.kernels  # noqa: F401  (registers torch.ops.sparse_compile.*)
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"].append(f"import sparse_compile.kernels: {e}")
    from sparse_compile.kernels import triton_conv as tconv
    from sparse_compile.kernels import triton_linear as tlin

    correctness(tlin, tconv)
    op_correctness()
    timings(tlin)
    print_table()
    check_targets()
    cuda_graph(tlin)
    split_sweep(tlin)
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
