"""Build (on first use) and load the C++ CPU kernels in ``csrc/condensed_cpu.cpp``.

The library registers CPU kernels for ``sparse_compile::_condensed_linear_cpu`` and
``_condensed_conv2d_cpu`` (schemas are defined in ``ops.py``). It is compiled with
``torch.utils.cpp_extension.load`` into the default torch_extensions cache, so the build happens
once per machine (measured on the 2-core dev box: 21-31 s wall, ~17 s of CPU) and later
processes only load the ``.so`` (~0.1 s). Set ``SPARSE_COMPILE_NO_CPP=1`` to skip it. When the
build fails, or there is no compiler, the ops fall back to the plain-torch reference and a
warning says so.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings

import torch

__all__ = ["load", "is_loaded", "build_info"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "condensed_cpu.cpp")
_lock = threading.Lock()
_state = {"tried": False, "loaded": False, "seconds": None, "error": None, "flags": None}


def _flags():
    """Compiler flags for this CPU; the ISA goes into the library name so caches never mix ISAs.

    ``SPARSE_COMPILE_CPU_ISA=generic`` forces the portable (non-AVX2) kernels, e.g. to test them.
    """
    cap = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if os.environ.get("SPARSE_COMPILE_CPU_ISA", "") == "generic":
        cap = "DEFAULT"
    base = ["-O3", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG"]
    if cap in ("AVX2", "AVX512"):
        # Every AVX2 CPU (Intel Haswell+, AMD Zen+) also has F16C and BMI1/2, which the kernels use.
        return "avx2", base + ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"]
    return "generic", base


def is_loaded() -> bool:
    """Whether the C++ kernels are loaded (does not try to build them)."""
    return _state["loaded"]


def build_info() -> dict:
    """Whether the build was tried / succeeded, its wall time in seconds, error, and flags."""
    return dict(_state)


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
            # Importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines:
            # irrelevant to a CPU build, and alarming in a user's log.
            log = logging.getLogger("torch.utils.cpp_extension")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load as _cpp_load
            finally:
                log.setLevel(level)

            isa, flags = _flags()
            _state["flags"] = flags
            t0 = time.perf_counter()
            # The torch version is in the name so that two environments sharing the extension
            # cache (~/.cache/torch_extensions) never load a library built against other headers.
            tv = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
            _cpp_load(
                name=f"sparse_compile_condensed_cpu_{isa}_torch{tv}",
                sources=[_SRC],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=os.environ.get("SPARSE_COMPILE_VERBOSE_BUILD", "") not in ("", "0"),
            )
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
