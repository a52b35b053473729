"""optimize(..., dtype=torch.bfloat16): a bf16 model whose condensed layers use bf16 values."""
import pytest
import torch
from torch import nn

import sparse_compile
from sparse_compile.compiler import modules as L
from sparse_models import srigl_init


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    srigl_init(model, sparsity=0.9, ablate=0.1)
    return model.eval()


def test_bf16_end_to_end_is_bounded_against_fp32():
    model = _mlp()
    x = torch.randn(32, 256)
    opt = sparse_compile.optimize(model, (x,), mode="condensed", dtype=torch.bfloat16)
    condensed = [m for m in opt.modules() if isinstance(m, L.CondensedLinear)]
    assert condensed, "no condensed layer"
    assert all(m.values.dtype == torch.bfloat16 for m in condensed)
    assert all(p.dtype == torch.bfloat16 for p in opt.parameters() if p.is_floating_point())
    rep = opt.sparse_compile_report
    assert rep.error_vs_original_dtype is not None and rep.error_vs_original_dtype < 5e-2
    with torch.no_grad():
        y = opt(x.bfloat16())
        ref = model(x)
    assert y.dtype == torch.bfloat16
    err = float((y.float() - ref).abs().max() / ref.abs().max())
    assert err < 5e-2 and err == pytest.approx(rep.error_vs_original_dtype, rel=1e-6)
    # The input model is untouched and still fp32.
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dtype_is_validated_and_serialised():
    with pytest.raises(ValueError, match="OptimizeConfig.dtype"):
        sparse_compile.OptimizeConfig(dtype="int8")
    cfg = sparse_compile.OptimizeConfig(dtype=torch.bfloat16)
    assert cfg.dtype == "bfloat16"
    assert sparse_compile.OptimizeConfig.from_dict(cfg.to_dict()).dtype == "bfloat16"


def test_bf16_auto_with_the_whole_model_check():
    # auto rebuilds the model for its whole-model candidates: they must be bf16 too.
    model = _mlp()
    x = torch.randn(32, 256)
    opt = sparse_compile.optimize(model, (x,), mode="auto", dtype="bfloat16", repeats=2, warmup=0, cache=False)
    assert opt.sparse_compile_report.whole_model is not None
    assert all(p.dtype == torch.bfloat16 for p in opt.parameters() if p.is_floating_point())
    assert opt.sparse_compile_report.error_vs_original_dtype < 5e-2
