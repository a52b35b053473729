"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one.

The interpreter the other Triton tests use on CPU does not run triton's compiler, so type and
layout errors of the real kernels would otherwise surface only on a GPU machine.
"""
import pytest

# Runs in a subprocess because TRITON_INTERPRET=1 (set by conftest without a GPU) turns triton's
# own library functions (tl.sum, tl.cdiv, ...) into interpreter objects at import time.
_COMPILE_SCRIPT = r"""
import sys
import torch, triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError as e:
    print(f"no NVIDIA backend in this triton: {e}")
    sys.exit(77)
from triton.compiler import ASTSource
from sparse_compile.kernels import triton_conv as C, triton_linear as L


def build(kernel, types, const, div16=(), num_warps=4):
    names = kernel.arg_names
    sig = {a: "constexpr" if a in const else types.get(a, "i32") for a in names}
    constexprs = {(names.index(a),): v for a, v in const.items()}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    out = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps, "num_stages": 1})
    assert out.asm["cubin"]


def meta(cfg):
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}


flags = dict(HAS_BIAS=True, ACC_F64=False, WIDE=False)
for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    ptrs = dict(v_ptr=f"*{dt}", i_ptr="*i16", bias_ptr=f"*{dt}", y_ptr=f"*{dt}")
    for batch in (256, 2048):
        cfg = L.linear_configs("batched", batch, 307, tdt)[0]
        build(L._condensed_fm_kernel, dict(ptrs, xt_ptr=f"*{dt}"),
              dict(flags, s_xb=1, s_vk=1, s_ik=1, s_yn=1, **meta(cfg)),
              ("xt_ptr", "v_ptr", "i_ptr", "y_ptr", "B", "Bp", "n", "s_xi", "s_yb", "s_ys"), cfg["num_warps"])
    cfg = L.linear_configs("gemv", 1, 307)[1]
    build(L._condensed_gemv_kernel, dict(ptrs, x_ptr=f"*{dt}"), dict(flags, s_xi=1, s_vk=1, s_ik=1, s_yn=1, **meta(cfg)),
          num_warps=cfg["num_warps"])
    build(L._to_feature_major_kernel, dict(x_ptr=f"*{dt}", xt_ptr=f"*{dt}"), dict(s_xi=1, WIDE=False, BLOCK_B=64, BLOCK_I=64))
    build(L._split_sum_kernel, dict(ws_ptr="*fp32", bias_ptr=f"*{dt}", y_ptr=f"*{dt}"), dict(HAS_BIAS=True, WIDE=False, BLOCK=1024))
cfg = C.conv_configs()[0]
build(C._condensed_conv2d_kernel, dict(x_ptr="*fp32", v_ptr="*fp32", i_ptr="*i16", bias_ptr="*fp32", y_ptr="*fp32"),
      dict(flags, s_xw=1, s_vk=1, s_ik=1, s_yw=1, KH=3, KW=3, **meta(cfg)), num_warps=cfg["num_warps"])
print("compiled OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel (a config of each list, fp32 and bf16) compiles to an sm_90 cubin."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled OK" in r.stdout
