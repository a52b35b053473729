"""A broad zoo of timm architectures (tests/zoo_models.py), random weights sparsified as a trained
SRigL model has them: exact in modes "ablated_dense", "condensed" and "auto", and in "condensed"
at least 95% of the sparse weights (layers of at least ``min_numel`` weights) in a sparse form,
except the models listed in ``LOW_COVERAGE`` with the reason."""
import warnings

import pytest
import torch

from sparse_compile.compiler import optimize, relative_error
from sparse_compile.compiler.coverage import coverage

pytest.importorskip("timm", reason="the zoo is timm's architectures")
from zoo_models import LOW_COVERAGE, ZOO, build  # noqa: E402


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


def test_zoo_is_broad():
    assert len(ZOO) >= 30
    assert len(set(ZOO) - set(LOW_COVERAGE)) >= 20


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_exact_and_covered(name):
    model, x = build(name)
    with torch.no_grad():
        ref = model(x)
    assert ref.std() > 0  # a constant output would prove nothing
    for mode in ("ablated_dense", "condensed", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # strict: a layer at fault raises instead of being kept, so exactness is the pass's own.
            # "auto" with a tiny timing budget: one timed call per form, no whole-model timing.
            opt = optimize(model, (x,), mode=mode, strict=True, repeats=1, warmup=0, whole_model_check=False)
        with torch.no_grad():
            err = relative_error(opt(x), ref)
        assert err <= 1e-5, f"{name} mode {mode}: relative error {err:.2e}"
        rep = opt.sparse_compile_report
        if mode == "condensed":
            c = coverage(rep)
            assert c.sparse_weights > 0
            if name not in LOW_COVERAGE:
                assert c.share >= 0.95, f"{name}: {c.line()}"
            assert " ".join(c.line().split()) in " ".join(str(rep).split())  # (wrapped at 100 columns)
