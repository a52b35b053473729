"""Launch plumbing shared by the Triton launchers (triton_linear.py, triton_conv.py).

Direct launches in plain eager calls and ``torch.library.wrap_triton`` only while tracing
(:func:`tracing`), a device guard, the autotuner wrappers with a per-key cache of their choice
(eager calls then launch the JIT kernel directly), and small host-side helpers.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Dict, List, Optional

import torch
import triton

_I32_MAX = 2**31 - 1


# Read once, as triton itself does when it decorates the kernels at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1`` when
    this module was imported)."""
    return _INTERPRET


_WRAP = getattr(torch.library, "wrap_triton", None)
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack


def tracing(x) -> bool:
    """Whether a launch with first tensor argument ``x`` is being traced or compiled.

    torch.compile (dynamo), make_fx / AOTAutograd / export (a torch dispatch mode is active) and
    fake or functional tensors need the launch recorded as a ``wrap_triton`` node; a plain eager
    call does not, and ``wrap_triton``'s eager path (a higher-order-op dispatch) costs hundreds of
    microseconds a launch, more than the kernels themselves at batch 1."""
    return _is_compiling() or _dispatch_stack_len() > 0 or type(x) is not torch.Tensor


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel`` directly in plain eager calls; through ``torch.library.wrap_triton``
    (visible to inductor inside a triton_op, traceable by make_fx / export) while tracing."""
    if _WRAP is not None and not interpreting() and tracing(args[0]):
        _WRAP(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a constexpr function: ~10 us a call)."""
    return -(-a // b)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset of these tensors can exceed int32 (then kernels use int64)."""
    for t in tensors:
        if t.numel() < _I32_MAX and t.is_contiguous():
            continue  # offsets < numel: the common case without the per-dimension sum
        if t.numel() and sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) >= _I32_MAX:
            return True
    return False


def _tune_bench(fn, quantiles=None, **_):
    # Short runs: the configs differ by tens of percent, and the default (25 ms warm-up, 100 ms
    # per config) makes first calls and max-autotune slow.
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


_TUNERS: Dict[tuple, object] = {}


def tuner(tag: tuple, kernel, configs: List[dict], key: List[str]):
    """The (cached) ``triton.autotune`` wrapper of ``kernel`` for one config list ``tag``."""
    t = _TUNERS.get(tag)
    if t is None:
        params = inspect.signature(triton.autotune).parameters
        extra = {}
        if "do_bench" in params:
            extra["do_bench"] = _tune_bench
        if "cache_results" in params:
            extra["cache_results"] = True
        cfgs = [_to_config(c) for c in configs]
        t = triton.autotune(configs=cfgs, key=key, **extra)(kernel)
        _TUNERS[tag] = t
    return t


def _to_config(c: dict):
    c = dict(c)
    num_warps = c.pop("num_warps", 4)
    num_stages = c.pop("num_stages", 1)
    extra = {"maxnreg": c.pop("maxnreg")} if "maxnreg" in c else {}
    return triton.Config(c, num_warps=num_warps, num_stages=num_stages, **extra)


_OPTIONS = ("num_warps", "num_stages", "maxnreg")
#: Autotuned choice per (tag, key values, tensor dtypes), as launch kwargs: eager calls launch the
#: JIT kernel with it directly, skipping the autotuner's per-call key and kwargs building.
_BEST: Dict[tuple, dict] = {}
_KEY_POS: Dict[tuple, tuple] = {}


def run_kernel(kernel, grid, args: tuple, meta: dict, config: Optional[dict], tag: tuple,
               configs: List[dict], key: List[str], default: dict, arg: str) -> None:
    """Launch ``kernel`` with a pinned ``config``, or autotuned over ``configs``.

    Interpreted runs cannot autotune (no device to time on), so they use ``default``. Once the
    autotuner has picked a config for a key, plain eager calls launch with it directly; traced
    calls always go through the autotuner (inductor sees, and may re-tune, the whole list).
    """
    if config is None and interpreting():
        config = default
    if config is not None:
        names = {k for k in default if k not in _OPTIONS}
        given = {k for k in config if k not in _OPTIONS}
        if given != names:
            raise ValueError(f"{arg}: config must set exactly {sorted(names)} (plus optional num_warps, "
                             f"num_stages, maxnreg), got {sorted(given)}")
        launch(kernel, grid, *args, **meta, **config)
        return
    if tracing(args[0]):  # sizes may be symbolic: no cache lookups, the autotuner goes in the graph
        # Inductor (torch 2.11) cannot precompute the grid of a config that carries maxnreg
        # ("Precomputed grid not found"): traced launches autotune the list without it.
        plain, seen = [], set()
        for c in configs:
            c = {a: b for a, b in c.items() if a != "maxnreg"}
            if tuple(c.items()) not in seen:
                seen.add(tuple(c.items()))
                plain.append(c)
        launch(tuner(tag + ("traced",), kernel, plain, key), grid, *args, **meta)
        return
    t = tuner(tag, kernel, configs, key)
    pos = _KEY_POS.get(tag)
    if pos is None:
        pos = _KEY_POS[tag] = tuple(kernel.arg_names.index(k) for k in key)
    # Every kernel here takes its five tensors first (x, values, indices, bias, out).
    ck = (tag, *[args[i] for i in pos], args[0].dtype, args[1].dtype, args[2].dtype, args[3].dtype, args[4].dtype)
    best = _BEST.get(ck)
    if best is not None:
        kernel[grid(best)](*args, **meta, **best)
        return
    launch(t, grid, *args, **meta)
    if getattr(t, "best_config", None) is not None:
        _BEST[ck] = t.best_config.all_kwargs()


def device_guard(device: torch.device):
    """Context that makes ``device`` the current CUDA device for a launch.

    Triton launches on the current device's current stream, not on the tensors' device: a call
    with tensors on ``cuda:1`` while ``cuda:0`` is current would run on the wrong GPU. The guard
    is only entered when the devices differ (the common case costs one device query)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()
