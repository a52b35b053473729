"""Build (on first use) and load the C++ CPU kernels in ``csrc/``.

The library registers CPU kernels for ``sparse_compile::_condensed_linear_cpu``
(``csrc/condensed_cpu.cpp``, with the AVX-512 kernels of ``condensed_avx512.h``) and
``_condensed_conv2d_cpu`` (``csrc/condensed_conv_cpu.cpp``), which share ``condensed_kernels.h``
(schemas are defined in ``ops.py``). It is compiled with
``torch.utils.cpp_extension.load`` into the default torch_extensions cache, so the build happens
once per machine (measured on the 2-core dev box: 21-31 s wall, ~17 s of CPU) and later
processes only load the ``.so`` (~0.1 s). Set ``SPARSE_COMPILE_NO_CPP=1`` to skip it. When the
build fails, or there is no compiler, the ops fall back to the plain-torch reference and a
warning says so.

Build variants (one library each, the ISA in its name): ``avx512bf16`` (AVX-512 F/BW/VL/DQ plus
AVX512_BF16: the batched bf16 kernel runs on VDPBF16PS), ``avx512``, ``avx2`` and ``generic``
(portable C++). ``load()`` builds the best one the CPU reports in ``/proc/cpuinfo`` (capped by
torch's own CPU capability) and, should the compiler reject its flags, the next one;
``SPARSE_COMPILE_CPU_ISA=<variant>`` forces a variant (an error if this CPU cannot run it).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
import time
import warnings

import torch

__all__ = ["load", "is_loaded", "build_info", "supported_isas", "selected_isa", "cpu_flags", "ISAS"]

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
#: Translation units of the library (the headers they include are hashed by ``_src_hash``).
_SOURCES = [os.path.join(_CSRC, name) for name in ("condensed_cpu.cpp", "condensed_conv_cpu.cpp")]
_lock = threading.Lock()
_state = {"tried": False, "loaded": False, "seconds": None, "error": None, "flags": None, "isa": None}


#: Build variants, best first. Each is its own library (the ISA is in its name), chosen at run time
#: from what this CPU reports; ``SPARSE_COMPILE_CPU_ISA=<name>`` forces one (e.g. to test it).
ISAS = ("avx512bf16", "avx512", "avx2", "generic")

_AVX2_NEEDS = frozenset({"avx2", "fma", "f16c", "bmi1", "bmi2"})
_AVX512_NEEDS = _AVX2_NEEDS | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
_NEEDS = {
    "avx512bf16": _AVX512_NEEDS | {"avx512_bf16"},
    "avx512": _AVX512_NEEDS,
    "avx2": _AVX2_NEEDS,
    "generic": frozenset(),
}
_BASE = ["-O3", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG"]
_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"]
_AVX512_FLAGS = _AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
_FLAGS = {
    "avx512bf16": _AVX512_FLAGS + ["-mavx512bf16"],
    "avx512": _AVX512_FLAGS,
    "avx2": _AVX2_FLAGS,
    "generic": [],
}
#: Highest variant each torch CPU capability allows: torch's own dispatch level (which
#: ATEN_CPU_CAPABILITY can lower) caps ours, so a user who pins torch to AVX2 gets AVX2 kernels.
_TORCH_CAP = {"AVX512": "avx512bf16", "AVX2": "avx2"}


def cpu_flags() -> frozenset:
    """The instruction-set flags this CPU reports (``/proc/cpuinfo``; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_isas() -> list:
    """Build variants this machine can run, best first (``generic`` always)."""
    flags = cpu_flags()
    cap = _TORCH_CAP.get(torch.backends.cpu.get_cpu_capability(), "generic")
    if not flags and cap != "generic":
        # No cpuinfo (not Linux): trust torch's own CPU detection, without the optional bf16.
        flags = _AVX512_NEEDS if cap == "avx512bf16" else _AVX2_NEEDS
    allowed = ISAS[ISAS.index(cap):]
    return [isa for isa in allowed if _NEEDS[isa] <= flags]


def isa_unsupported_reason(isa: str):
    """Why this machine cannot run build variant ``isa`` (None if it can)."""
    if isa not in ISAS:
        return f"unknown CPU ISA variant {isa!r} (choose from {', '.join(ISAS)})"
    if isa in supported_isas():
        return None
    missing = sorted(_NEEDS[isa] - cpu_flags())
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return f"torch's CPU capability is {torch.backends.cpu.get_cpu_capability()}"


def selected_isa() -> str:
    """The variant ``load()`` builds: ``SPARSE_COMPILE_CPU_ISA`` if set, else the best supported."""
    forced = os.environ.get("SPARSE_COMPILE_CPU_ISA", "")
    if forced:
        reason = isa_unsupported_reason(forced)
        if reason is not None:
            raise RuntimeError(f"SPARSE_COMPILE_CPU_ISA={forced}: {reason}")
        return forced
    return supported_isas()[0]


def _src_hash() -> str:
    # The headers are not among cpp_extension's hashed sources: their hash in a define makes an
    # edited header rebuild the library.
    h = hashlib.sha1()
    for name in sorted(os.listdir(_CSRC)):
        if name.endswith((".cpp", ".h")):
            with open(os.path.join(_CSRC, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def _flags(isa: str) -> list:
    """Compiler flags of build variant ``isa``."""
    return _BASE + _FLAGS[isa] + [f"-DSC_SRC_HASH={_src_hash()}"]


def is_loaded() -> bool:
    """Whether the C++ kernels are loaded (does not try to build them)."""
    return _state["loaded"]


def import_cpp_extension_quietly() -> None:
    """Import ``torch.utils.cpp_extension`` (also imported by ``torch.utils.benchmark``) without its
    "No CUDA runtime is found" log line: irrelevant on a CPU-only machine, and alarming in a user's log."""
    if "torch.utils.cpp_extension" in sys.modules:  # imported already: nothing left to log
        return
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.setLevel(level)


def build_info() -> dict:
    """Whether the build was tried / succeeded, its wall time in seconds, error, and flags."""
    return dict(_state)


def _build(isa: str, flags: list) -> None:
    from torch.utils.cpp_extension import load as _cpp_load

    # The torch version is in the name so that two environments sharing the extension
    # cache (~/.cache/torch_extensions) never load a library built against other headers.
    tv = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    _cpp_load(
        name=f"sparse_compile_condensed_cpu_{isa}_torch{tv}",
        sources=list(_SOURCES),
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=os.environ.get("SPARSE_COMPILE_VERBOSE_BUILD", "") not in ("", "0"),
    )


def load() -> bool:
    """Build (first time on this machine) and load the C++ kernels; False if unavailable.

    Thread-safe and attempted once per process; a failure warns and returns False thereafter.
    """
    if _state["tried"]:
        return _state["loaded"]
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        try:
            if os.environ.get("SPARSE_COMPILE_NO_CPP", "") not in ("", "0"):
                raise RuntimeError("disabled by SPARSE_COMPILE_NO_CPP")
            import_cpp_extension_quietly()

            forced = bool(os.environ.get("SPARSE_COMPILE_CPU_ISA", ""))
            candidates = [selected_isa()] if forced else supported_isas()
            t0 = time.perf_counter()
            errors = []
            for isa in candidates:  # a compiler too old for a variant's flags: try the next one
                flags = _flags(isa)
                _state["flags"], _state["isa"] = flags, isa
                try:
                    _build(isa, flags)
                    break
                except Exception as e:  # noqa: BLE001 (re-raised below once every variant failed)
                    errors.append(f"{isa}: {type(e).__name__}: {e}")
                    if isa == candidates[-1]:
                        raise RuntimeError("; ".join(errors)[-2000:]) from e
            _state["seconds"] = time.perf_counter() - t0
            _state["loaded"] = True
        except Exception as e:  # no compiler, failed build, disabled: all fall back the same way
            _state["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(
                "sparse_compile: C++ CPU kernels unavailable "
                f"({_state['error'][:300]}); condensed ops on CPU fall back to the plain-torch "
                "reference (dense-speed, not sparse-speed).",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            _state["tried"] = True
    return _state["loaded"]
