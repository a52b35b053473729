"""Every public condensed-kernel entry refuses indices its input cannot back, before a kernel reads.

Cases that could crash the process if a check regressed (out-of-range reads) run in a subprocess.
"""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import sparse_compile  # noqa: F401  (registers torch.ops.sparse_compile.*)
from sparse_compile.kernels import condensed_conv2d, condensed_linear, validate
from sparse_compile.kernels.reference import condensed_linear_ref
from sparse_compile.compiler.modules import CondensedConv2d, CondensedLinear


def _run_isolated(body: str) -> dict:
    """Run ``body`` (which fills ``out[case] = result``) in a fresh interpreter; crashes show as rc != 0."""
    code = textwrap.dedent("""
        import json, torch, sparse_compile
        from sparse_compile.kernels import condensed_linear, condensed_conv2d
        from sparse_compile.compiler.modules import CondensedLinear, CondensedConv2d
        out = {}
        def attempt(case, fn):
            try:
                r = fn()
                out[case] = "returned " + str(tuple(r.shape))
            except (ValueError, TypeError) as e:
                out[case] = type(e).__name__ + ": " + str(e)
    """) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"subprocess crashed (rc {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_out_of_range_indices_refused_at_every_entry():
    res = _run_isolated("""
        torch.manual_seed(0)
        x = torch.randn(1, 64); xb = torch.randn(8, 64)
        v = torch.randn(16, 8)
        for bad in (-1, 64, 2**20, 2**30):
            i = torch.randint(0, 64, (16, 8), dtype=torch.int32)
            i[3, 5] = bad
            attempt(f"wrapper b1 {bad}", lambda: condensed_linear(x, v, i))
            attempt(f"wrapper b8 {bad}", lambda: condensed_linear(xb, v, i))
            attempt(f"op {bad}", lambda: torch.ops.sparse_compile.condensed_linear(x, v, i, None))
            attempt(f"op grad {bad}", lambda: condensed_linear(x.requires_grad_(), v, i))
            xc = torch.randn(1, 4, 6, 6); vc = torch.randn(5, 6)
            ic = torch.randint(0, 36, (5, 6), dtype=torch.int32); ic[0, 0] = bad if bad != 64 else 36
            attempt(f"conv wrapper {bad}", lambda: condensed_conv2d(xc, vc, ic, None, 3))
            attempt(f"conv op {bad}", lambda: torch.ops.sparse_compile.condensed_conv2d(
                xc, vc, ic, None, [3, 3], [1, 1], [0, 0], [1, 1]))
        # a view into a larger tensor: index 64 would read the 65th column of `big`
        big = torch.randn(1, 128)
        i = torch.randint(0, 64, (16, 8), dtype=torch.int32); i[0, 0] = 64
        attempt("view", lambda: condensed_linear(big[:, :64], v, i))
        # int16 indices cannot address a fan-in past 32768
        i16 = torch.randint(0, 100, (16, 8), dtype=torch.int16)
        attempt("int16 wide", lambda: condensed_linear(torch.randn(1, 40000), v, i16))
        i16n = i16.clone(); i16n[0, 0] = -30000
        attempt("int16 negative", lambda: condensed_linear(torch.randn(1, 64), v, i16n))
        # meta-device indices with real inputs
        attempt("meta", lambda: condensed_linear(x, v, torch.zeros(16, 8, dtype=torch.int32, device="meta")))
        attempt("meta op", lambda: torch.ops.sparse_compile.condensed_linear(
            x, v, torch.zeros(16, 8, dtype=torch.int32, device="meta"), None))
    """)
    for case, r in res.items():
        assert r.startswith(("ValueError", "TypeError")), f"{case}: {r}"
    for bad in (-1, 64, 2 ** 20, 2 ** 30):
        assert (f"index {bad} is out of range" in res[f"wrapper b1 {bad}"]) or (bad < 0 and "negative index" in res[f"wrapper b1 {bad}"])
    assert "int16 indices cannot address a fan-in of 40000" in res["int16 wide"]
    assert "negative index -30000" in res["int16 negative"]
    assert "meta" in res["meta"] and "meta" in res["meta op"]
    assert "index 64 is out of range for a fan-in of 64" in res["view"]


def test_csr_mm_op_checks_its_arrays():
    """torch.ops.sparse_compile.csr_mm skips torch's CSR invariant checks, so it checks (once) itself."""
    res = _run_isolated("""
        import sparse_compile.compiler.modules
        torch.manual_seed(0)
        w = (torch.randn(6, 10) * (torch.rand(6, 10) < 0.3)).to_sparse_csr()
        cr, co, v = w.crow_indices(), w.col_indices(), w.values()
        x = torch.randn(10, 3)
        attempt("ok", lambda: torch.ops.sparse_compile.csr_mm(cr, co, v, 10, x))
        co2 = co.clone(); co2[0] = 10 ** 6
        attempt("col", lambda: torch.ops.sparse_compile.csr_mm(cr, co2, v, 10, x))
        cr2 = cr.clone(); cr2[-1] = 10 ** 6
        attempt("crow", lambda: torch.ops.sparse_compile.csr_mm(cr2, co, v, 10, x))
        attempt("x", lambda: torch.ops.sparse_compile.csr_mm(cr, co, v, 10, torch.randn(5, 3)))
    """)
    assert res["ok"] == "returned (6, 3)"
    assert "column index out of range [0, 10)" in res["col"]
    assert "crow_indices must start at 0" in res["crow"]
    assert "x must be [10, m]" in res["x"]


def test_condensed_modules_refuse_wrong_input_width():
    """Reachable without tampering: an optimized layer called with the wrong width / channels."""
    res = _run_isolated("""
        torch.manual_seed(0)
        v = torch.randn(16, 8)
        i = torch.stack([torch.randperm(64)[:8] for _ in range(16)]).to(torch.int32)
        lin = CondensedLinear(v, i, None, 64)
        attempt("narrow", lambda: lin(torch.randn(2, 32)))
        attempt("wide", lambda: lin(torch.randn(2, 65)))
        attempt("ok", lambda: lin(torch.randn(2, 64)))
        ic = torch.stack([torch.randperm(8 * 9)[:6] for _ in range(5)]).to(torch.int32)
        conv = CondensedConv2d(torch.randn(5, 6), ic, None, 8, 3, padding=1)
        attempt("conv few channels", lambda: conv(torch.randn(1, 2, 8, 8)))
        attempt("conv ok", lambda: conv(torch.randn(1, 8, 8, 8)))
        bad = i.clone(); bad[0, 0] = 64
        attempt("construct bad", lambda: CondensedLinear(v, bad, None, 64))
    """)
    assert "input has 32 features, the layer expects 64" in res["narrow"]
    assert "input has 65 features" in res["wide"]
    assert res["ok"] == "returned (2, 16)"
    assert "expected input [N, 8, H, W]" in res["conv few channels"]
    assert res["conv ok"] == "returned (1, 5, 8, 8)"
    assert "index 64 is out of range for a fan-in of 64 (in_features)" in res["construct bad"]


def test_optimized_model_with_wrong_width_raises():
    from torch import nn

    from sparse_compile.compiler import optimize
    from sparse_models import srigl_init

    model = srigl_init(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval())
    opt = optimize(model, (torch.randn(1, 64),), mode="condensed")
    with pytest.raises((ValueError, RuntimeError)):
        model(torch.randn(1, 48))  # the original refuses
    with pytest.raises(ValueError, match="expects 64"):
        opt(torch.randn(1, 48))


def test_cache_is_used_and_invalidated_by_in_place_edits():
    torch.manual_seed(0)
    x, v = torch.randn(1, 64), torch.randn(16, 8)
    i = torch.randint(0, 64, (16, 8), dtype=torch.int32)
    assert not validate.fast_ok(i, 64)
    torch.testing.assert_close(condensed_linear(x, v, i), condensed_linear_ref(x, v, i))
    assert validate.fast_ok(i, 64)  # the next call is an O(1) compare
    assert not validate.fast_ok(i, int(i.max()))  # a narrower input is not covered
    i[2, 2] = 64  # in-place edit bumps the version counter
    assert not validate.fast_ok(i, 64)
    with pytest.raises(ValueError, match="index 64 is out of range"):
        condensed_linear(x, v, i)
    i[2, 2] = 0
    row = i[1]  # an edit through a view shares the version counter
    condensed_linear(x, v, i)
    row[0] = 99
    with pytest.raises(ValueError, match="index 99 is out of range"):
        condensed_linear(x, v, i)


def test_copies_do_not_inherit_a_stale_cache():
    i = torch.randint(0, 64, (4, 3), dtype=torch.int32)
    validate.index_max(i)
    c = copy.deepcopy(i)
    assert not validate.fast_ok(c, 64)  # the copied attribute names another tensor
    i2 = torch.zeros(4, 3, dtype=torch.int32)
    validate.index_max(i2)
    i2.data = torch.full((4, 3), 70, dtype=torch.int32)  # .data swaps keep the version counter
    with pytest.raises(ValueError, match="index 70 is out of range"):
        condensed_linear(torch.randn(1, 64), torch.randn(4, 3), i2)


def test_meta_everything_still_traces():
    """Shape inference on meta tensors (nothing is read) keeps working."""
    x = torch.empty(2, 64, device="meta")
    v = torch.empty(16, 8, device="meta")
    i = torch.empty(16, 8, dtype=torch.int32, device="meta")
    assert condensed_linear(x, v, i).shape == (2, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_cuda_entries_refuse_out_of_range_indices():
    res = _run_isolated("""
        x = torch.randn(1, 64, device="cuda"); v = torch.randn(16, 8, device="cuda")
        i = torch.randint(0, 64, (16, 8), dtype=torch.int32, device="cuda"); i[0, 0] = 64
        attempt("wrapper", lambda: condensed_linear(x, v, i))
        attempt("op", lambda: torch.ops.sparse_compile.condensed_linear(x, v, i, None))
        xc = torch.randn(1, 2, 6, 6, device="cuda"); ic = torch.randint(0, 18, (5, 6), dtype=torch.int32, device="cuda")
        ic[0, 0] = 18
        attempt("conv", lambda: condensed_conv2d(xc, torch.randn(5, 6, device="cuda"), ic, None, 3))
        torch.cuda.synchronize()
    """)
    assert all(r.startswith("ValueError") and "out of range" in r for r in res.values()), res
