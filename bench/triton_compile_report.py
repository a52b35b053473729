"""Registers, spills and load widths of the shipped Triton configs, compiled for sm_90 (no GPU).

    python -m bench.triton_compile_report            # table: every shipped fp32 / bf16 config
    python -m bench.triton_compile_report --check    # exit 1 if any config spills

Each autotune entry of the batched (feature-major) and GEMV linear kernels and of the conv
kernel is compiled ahead of time for a Hopper GPU (``GPUTarget("cuda", 90, 32)``), with the
specialisation a real call gets (unit strides as constants, 16-divisible sizes and pointers
marked so). ``ptxas -v`` (the copy bundled with triton) gives registers and spill bytes; the PTX
gives the global loads by width (``ld.global.v4`` = 128-bit, what a coalesced gather of 4 fp32 /
8 bf16 per lane should be). Runs without TRITON_INTERPRET (it is removed here).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions: the interpreter has no compiler

import torch  # noqa: E402
import triton  # noqa: E402

TARGET_ARCH = 90


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(kernel, types: dict, const: dict, div16=(), options=None):
    """``triton.compile`` of ``kernel`` for sm_90: returns the compiled kernel (asm: ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {a: "constexpr" if a in const else types.get(a, "i32") for a in names}
    constexprs = {(names.index(a),): v for a, v in const.items()}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", TARGET_ARCH, 32),
                          options=dict(num_stages=1, **(options or {})))


def stats(compiled) -> dict:
    """Registers and spill bytes (ptxas -v on the PTX) and global loads by width (PTX)."""
    ptx = compiled.asm["ptx"]
    m = re.search(r"\.maxnreg\s+(\d+)", ptx)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), f"-arch=sm_{TARGET_ARCH}a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    loads = re.findall(r"ld\.global(?:\.\w+)*?(\.v[248])?\.(?:b|u|s|f)(\d+)", ptx)
    widths = {}
    for vec, bits in loads:
        w = int(bits) * (int(vec[2:]) if vec else 1)
        widths[w] = widths.get(w, 0) + 1
    body = [ln for ln in ptx.splitlines() if ln.strip().endswith(";") and not ln.strip().startswith(".")]
    return dict(regs=int(regs.group(1)) if regs else None, ptx_instructions=len(body),
                spill_store=int(spills.group(1)) if spills else None,
                spill_load=int(spills.group(2)) if spills else None,
                maxnreg=int(m.group(1)) if m else None,
                loads_by_bits=dict(sorted(widths.items())), ptxas_ok=r.returncode == 0, log=log[-400:])


def _meta(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "maxnreg")}


def _opts(cfg: dict) -> dict:
    o = dict(num_warps=cfg.get("num_warps", 4))
    if cfg.get("maxnreg"):
        o["maxnreg"] = cfg["maxnreg"]
    return o


def shipped_builds():
    """(label, kernel, types, constexprs, div16, options) for every shipped config of interest."""
    from sparse_compile.kernels import triton_conv as C
    from sparse_compile.kernels import triton_linear as L

    flags = dict(HAS_BIAS=True, ACC_F64=False, WIDE=False)
    out = []
    for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ptrs = dict(v_ptr=f"*{dt}", i_ptr="*i16", bias_ptr=f"*{dt}", y_ptr=f"*{dt}")
        for batch in (256, 2048):
            for cfg in L.linear_configs("batched", batch, 307, tdt):
                types = dict(ptrs, xt_ptr=f"*{dt}", ws_ptr="*fp32", cnt_ptr="*i32")
                const = dict(flags, s_xb=1, s_vk=1, s_ik=1, s_yn=1, **_meta(cfg))
                div = ("xt_ptr", "v_ptr", "i_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "B", "Bp", "n", "s_xi", "s_yb")
                label = f"fm   {dt} B={batch:<4d} " + " ".join(f"{k}={v}" for k, v in cfg.items() if k != "num_stages")
                out.append((label, L._condensed_fm_kernel, types, const, div, _opts(cfg)))
        for batch in (1, 16):
            for cfg in L.linear_configs("gemv", batch, 307, tdt):
                const = dict(flags, s_xi=1, s_vk=1, s_ik=1, s_yn=1, **_meta(cfg))
                label = f"gemv {dt} B={batch:<4d} " + " ".join(f"{k}={v}" for k, v in cfg.items() if k != "num_stages")
                out.append((label, L._condensed_gemv_kernel, dict(ptrs, x_ptr=f"*{dt}"), const,
                            ("x_ptr", "v_ptr", "i_ptr", "y_ptr", "n", "s_xb"), _opts(cfg)))
    for cfg in C.conv_configs():
        const = dict(flags, s_xw=1, s_vk=1, s_yw=1, **_meta(cfg))
        label = "conv fp32       " + " ".join(f"{k}={v}" for k, v in cfg.items() if k != "num_stages")
        out.append((label, C._condensed_conv2d_kernel,
                    dict(x_ptr="*fp32", v_ptr="*fp32", t_ptr="*i32", r_ptr="*i32", bias_ptr="*fp32", y_ptr="*fp32"),
                    const, ("x_ptr", "v_ptr", "t_ptr", "r_ptr", "y_ptr", "s_xh", "s_xn", "s_yc", "s_yn"),
                    _opts(cfg)))
    return out


def main(argv=None) -> int:
    """Compile every shipped config; print the table (and with --check, fail on spills)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a config spills or does not compile")
    ap.add_argument("--only", default="", help="substring filter on the row label")
    args = ap.parse_args(argv)
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        print(f"no NVIDIA backend in this triton: {e}")
        return 77
    bad = []
    print(f"sm_{TARGET_ARCH}, triton {triton.__version__}: regs, spill bytes (store/load), PTX instructions, "
          "global loads by bits")
    for label, kernel, types, const, div, opts in shipped_builds():
        if args.only not in label:
            continue
        try:
            s = stats(compile_one(kernel, types, const, div, opts))
        except Exception as e:  # noqa: BLE001 - report every config
            print(f"  {label}: COMPILE FAILED {type(e).__name__}: {str(e)[:200]}")
            bad.append(label)
            continue
        spill = (s["spill_store"] or 0) + (s["spill_load"] or 0)
        loads = " ".join(f"{b}b x{n}" for b, n in s["loads_by_bits"].items())
        print(f"  {label:78s} regs {s['regs']!s:>4s}  spill {s['spill_store']}/{s['spill_load']}  "
              f"ptx {s['ptx_instructions']:5d}  loads {loads}")
        if spill or not s["ptxas_ok"] or s["regs"] is None:
            bad.append(label)
    if bad:
        print("spilling or failing: " + "; ".join(bad))
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
