"""The Triton launchers' boundary: strides, index widths and the CUDA device they launch on.

Runs through triton's CPU interpreter without a GPU (see tests/conftest.py). Each test here
failed before the launchers made bias contiguous, checked int16 index ranges and entered a
device guard.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from sparse_compile.kernels import triton_conv as tconv
from sparse_compile.kernels import triton_launch as tlaunch
from sparse_compile.kernels import triton_layout as tlayout
from sparse_compile.kernels import triton_linear as tlin
from sparse_compile.kernels.reference import condensed_conv2d_ref

from triton_testlib import DEV, INTERPRETER_PROBLEM, check_linear, rand_condensed, rel_err

pytestmark = pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM))


def strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose last dimension has stride 2 (every other element of a wider buffer)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    buf[..., 1::2] = 7  # garbage a stride-ignoring kernel would read
    return buf[..., ::2]


# kernel, batch, split_k: the GEMV kernel, the batched kernel alone, and split over the fan-in (the
# last program of a tile adds the partials and the bias).
PATHS = [("gemv", 3, None), ("batched", 20, 1), ("batched", 20, 3)]


@pytest.mark.parametrize("kernel,batch,split_k", PATHS, ids=["gemv", "batched", "split-sum"])
def test_linear_noncontiguous_bias(kernel, batch, split_k):
    vals, idx = rand_condensed(12, 64, 40)
    bias = strided(torch.randn(12, device=DEV))
    assert bias.stride(0) == 2
    x = torch.randn(batch, 64, device=DEV)
    kw = {} if split_k is None else dict(split_k=split_k)
    check_linear(x, vals, idx, bias, kernel=kernel, **kw)


@pytest.mark.parametrize("kernel,batch,split_k", PATHS, ids=["gemv", "batched", "split-sum"])
def test_linear_all_strided(kernel, batch, split_k):
    """x, values, indices and bias all with non-unit strides, int32 indices."""
    vals, idx = rand_condensed(9, 48, 33, index_dtype=torch.int32)
    x = strided(torch.randn(batch, 48, device=DEV))
    kw = {} if split_k is None else dict(split_k=split_k)
    check_linear(x, strided(vals), strided(idx), strided(torch.randn(9, device=DEV)), kernel=kernel, **kw)


def test_conv_noncontiguous_bias_values_indices():
    vals, idx = rand_condensed(5, 3 * 9, 8)
    bias = strided(torch.randn(5, device=DEV))
    x = torch.randn(2, 6, 6, 7, device=DEV)[:, ::2]
    args = ((3, 3), (1, 1), (1, 1), (1, 1))
    ref = condensed_conv2d_ref(x.double(), vals.double(), idx, bias.double(), *args)
    y = tconv.condensed_conv2d_triton(x, strided(vals), strided(idx), bias, *args)
    assert rel_err(y, ref) < 1e-5


def test_int16_indices_past_32767_rejected():
    vals, idx = rand_condensed(2, 16, 4)
    x = torch.randn(1, 40000, device=DEV)
    with pytest.raises(ValueError, match="int16 indices cannot address a fan-in of 40000"):
        tlin.condensed_linear_triton(x, vals, idx)
    xc = torch.randn(1, 4000, 3, 3, device=DEV)  # fan-in 4000 * 3 * 3 = 36000
    with pytest.raises(ValueError, match="int16 indices cannot address a fan-in of 36000"):
        tconv.condensed_conv2d_triton(xc, vals, idx, None, 3, 1, 1, 1)
    # int32 is fine at that width.
    tlin.condensed_linear_triton(x, vals, idx.int())


def test_int16_indices_reach_the_last_addressable_column():
    """A fan-in of exactly 2**15 is allowed, and index 32767 reads the last column."""
    fan_in = tlin.INT16_MAX_FAN_IN
    idx = torch.tensor([[0, 5, fan_in - 1], [1, fan_in - 2, fan_in - 1]], dtype=torch.int16, device=DEV)
    vals = torch.randn(2, 3, device=DEV)
    x = torch.randn(2, fan_in, device=DEV)
    check_linear(x, vals, idx, None, kernel="gemv")


# ---------------------------------------------------------------------------------------------
# Device guard (mocked: no second GPU here)
# ---------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self):
        self.entered, self.active = [], False

    def __call__(self, index):
        rec = self

        @contextlib.contextmanager
        def ctx():
            rec.entered.append(index)
            rec.active = True
            try:
                yield
            finally:
                rec.active = False

        return ctx()


def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", rec)
    with tlin.device_guard(torch.device("cuda", 1)):
        assert rec.active
    assert rec.entered == [1]
    for dev in (torch.device("cuda", 0), torch.device("cpu")):
        with tlin.device_guard(dev):
            assert not rec.active
    assert rec.entered == [1]


@pytest.mark.parametrize("which", ["gemv", "batched", "split-sum", "conv"])
def test_every_launch_runs_inside_the_device_guard(monkeypatch, which):
    """Each kernel launch (transpose, main kernel, split-sum) happens with the guard entered for
    x's device."""
    seen, active = [], []
    launched = []

    @contextlib.contextmanager
    def guard(device):
        seen.append(device)
        active.append(True)
        try:
            yield
        finally:
            active.pop()

    real_launch = tlin.launch

    def checked_launch(kernel, grid, *a, **kw):
        launched.append(bool(active))
        return real_launch(kernel, grid, *a, **kw)

    monkeypatch.setattr(tlin, "device_guard", guard)
    monkeypatch.setattr(tconv, "device_guard", guard)
    monkeypatch.setattr(tlayout, "launch", checked_launch)  # the transpose
    monkeypatch.setattr(tlaunch, "launch", checked_launch)  # run_kernel's launches
    if which == "conv":
        vals, idx = rand_condensed(4, 18, 5)
        x = torch.randn(1, 2, 5, 5, device=DEV)
        y = tconv.condensed_conv2d_triton(x, vals, idx, None, 3, 1, 1, 1)
        ref = F.conv2d(x.double(), tlin_dense(vals, idx, 18).reshape(4, 2, 3, 3), None, 1, 1, 1)
        assert rel_err(y, ref) < 1e-5
    else:
        vals, idx = rand_condensed(6, 40, 35)
        kw = dict(kernel="gemv") if which == "gemv" else dict(kernel="batched", split_k=1 if which == "batched" else 2)
        check_linear(torch.randn(18, 40, device=DEV), vals, idx, torch.randn(6, device=DEV), **kw)
    assert seen == [torch.device(DEV)]
    assert launched and all(launched), launched
    # The batched kernel is preceded by the transpose; a split one reduces in-kernel (no extra launch).
    assert len(launched) == {"gemv": 1, "batched": 2, "split-sum": 2, "conv": 1}[which]


def tlin_dense(vals, idx, fan_in):
    return torch.zeros(vals.shape[0], fan_in, dtype=torch.float64, device=vals.device).scatter_(
        1, idx.long(), vals.double())


# ---------------------------------------------------------------------------------------------
# Eager launches go direct; only traced ones through torch.library.wrap_triton
# ---------------------------------------------------------------------------------------------
def test_tracing_detection():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(3)
    assert not tlin.tracing(x)
    with FakeTensorMode() as mode:
        assert tlin.tracing(mode.from_tensor(x))
    seen = []
    make_fx(lambda t: seen.append(tlin.tracing(t)) or t + 1)(x)
    assert seen == [True]
    f = torch.compile(lambda t: t + int(tlin.tracing(t)), backend="eager", fullgraph=True)
    assert torch.equal(f(x), x + 1)


@pytest.mark.parametrize("traced", [False, True])
def test_launch_wraps_only_when_tracing(monkeypatch, traced):
    wrapped = []

    def fake_wrap(kernel):
        wrapped.append(kernel)
        return kernel

    monkeypatch.setattr(tlaunch, "_WRAP", fake_wrap)
    monkeypatch.setattr(tlaunch, "_INTERPRET", False)  # the interpreter never wraps; test the GPU rule
    monkeypatch.setattr(tlin, "_runs_here", lambda device: True)
    monkeypatch.setattr(tlaunch, "tracing", lambda x: traced)
    monkeypatch.setattr(tlin, "tracing", lambda x: traced)
    vals, idx = rand_condensed(5, 30, 6)
    check_linear(torch.randn(2, 30, device=DEV), vals, idx, None, kernel="gemv", config=tlin._GEMV_DEFAULT)
    assert len(wrapped) == (1 if traced else 0)


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_reduction_is_deterministic_and_leaves_counters_zeroed(splits):
    """Two split calls give bitwise-equal results (partials added in split order, not arrival
    order), and the persistent tile counters are back at zero after each call."""
    vals, idx = rand_condensed(11, 90, 70)
    x = torch.randn(21, 90, device=DEV)
    bias = torch.randn(11, device=DEV)
    y1 = check_linear(x, vals, idx, bias, kernel="batched", split_k=splits)
    cnt = tlin._COUNTERS[torch.device(DEV)]
    assert cnt.numel() > 0 and not cnt.any()
    y2 = tlin.condensed_linear_triton(x, vals, idx, bias, kernel="batched", split_k=splits)
    assert torch.equal(y1, y2)
    assert not cnt.any()


def test_conv_tap_tables_follow_index_updates_and_layouts():
    """The cached offset tables are rebuilt when the indices change in place or x's layout does."""
    vals, idx = rand_condensed(4, 18, 5)
    x = torch.randn(2, 2, 5, 6, device=DEV)
    args = ((3, 3), (1, 1), (1, 1), (1, 1))

    def check(xx):
        y = tconv.condensed_conv2d_triton(xx, vals, idx, None, *args)
        assert rel_err(y, condensed_conv2d_ref(xx.double(), vals.double(), idx, None, *args)) < 1e-5

    check(x)
    idx[:, 0] = 17 - idx[:, 0]  # in place: bumps the version the cache checks
    check(x)
    check(x.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("kernel,batch", [("gemv", 2), ("batched", 19)])
def test_pad_fan_in_gives_the_same_result(kernel, batch):
    vals, idx = rand_condensed(7, 50, 13)
    vp, ip = tlin.pad_fan_in(vals, idx)
    assert vp.shape == (7, 16) and ip.shape == (7, 16) and not vp[:, 13:].any() and not ip[:, 13:].any()
    x = torch.randn(batch, 50, device=DEV)
    y = check_linear(x, vp, ip, None, kernel=kernel)
    assert rel_err(y, linear_ref_of(x, vals, idx)) < 1e-5


def linear_ref_of(x, vals, idx):
    from sparse_compile.kernels.reference import condensed_linear_ref

    return condensed_linear_ref(x.double(), vals.double(), idx, None)


def test_traced_unsplit_launch_gets_no_aliased_arguments(monkeypatch):
    """Traced, the batched kernel's unused workspace/counter slots must not alias y or the indices
    (functionalization rejects a mutated tensor passed twice; seen under torch.compile on an H200)."""
    seen = []
    for mod in (tlin, tlaunch):
        monkeypatch.setattr(mod, "tracing", lambda x: True)
        monkeypatch.setattr(mod, "launch", lambda kernel, grid, *a, **kw: seen.append(a))
    vals, idx = rand_condensed(6, 30, 10)  # k < 64: no split candidates
    tlin.condensed_linear_triton(torch.randn(20, 30, device=DEV), vals, idx, kernel="batched")
    args = seen[-1]  # the batched kernel (after the transpose)
    ptrs = [a.data_ptr() for a in args[:7] if isinstance(a, torch.Tensor)]
    assert len(ptrs) == 7 and len(set(ptrs[4:])) == 3 and ptrs[6] != ptrs[2]
