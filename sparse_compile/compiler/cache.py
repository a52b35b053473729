"""The on-disk cache of "auto"'s timings of a layer's candidate forms (the timers are in :mod:`sparse_compile.timing`).

``optimize(mode="auto")`` times every exact form of every layer on the target device with the
shapes of the example inputs and keeps the fastest. The measurements are cached in a JSON file so a
second ``optimize`` of the same (or a same-shaped) model is fast. A key holds everything the time
depends on: device name and thread count, dtype, input shape, the form and its shape parameters,
and the torch / triton / sparse_compile versions.

The cache lives in ``$SPARSE_COMPILE_CACHE`` (a directory) or ``~/.cache/sparse_compile``; the file
is ``autotune.json``. A corrupt file is ignored (with a warning) and rewritten.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..timing import cpu_model

__all__ = ["cache_dir", "DecisionCache", "device_name", "library_versions", "timing_key"]

CACHE_ENV = "SPARSE_COMPILE_CACHE"
CACHE_FILE = "autotune.json"


def cache_dir() -> Path:
    """Directory of the decision cache (``$SPARSE_COMPILE_CACHE`` or ``~/.cache/sparse_compile``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparse_compile"


def device_name(device) -> str:
    """A name that identifies the hardware a timing was taken on (with CPU thread count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_model()} x{torch.get_num_threads()} threads"
    return device.type


def library_versions() -> dict:
    """Versions the timings depend on."""
    from .. import __version__

    try:
        import triton

        tv = triton.__version__
    except Exception:  # triton missing or broken: timings are still valid without it
        tv = None
    from ..kernels import cpu

    return {"torch": torch.__version__, "triton": tv, "sparse_compile": __version__,
            "cpu_kernels": bool(cpu.is_loaded())}


def timing_key(device, dtype: torch.dtype, input_shape, form: str, params: dict) -> str:
    """The cache key of one measurement (a stable JSON string)."""
    return json.dumps(
        {
            "device": device_name(device),
            "dtype": str(dtype).replace("torch.", ""),
            "input": list(input_shape),
            "form": form,
            "params": params,
            "versions": library_versions(),
        },
        sort_keys=True,
    )


class DecisionCache:
    """A JSON file of ``key -> seconds``. Reads once, writes atomically on :meth:`save`."""

    def __init__(self, directory: Optional[os.PathLike] = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(directory).expanduser() / CACHE_FILE if directory else cache_dir() / CACHE_FILE
        self._data: dict = {}
        self._dirty = False
        self.hits = 0
        self.misses = 0
        if enabled and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self._data = {k: float(v) for k, v in data.items()}
            except (ValueError, TypeError, OSError) as e:
                warnings.warn(f"sparse_compile: ignoring unreadable autotune cache {self.path} ({e})")
                self._data = {}

    def get(self, key: str) -> Optional[float]:
        """Cached seconds for ``key`` or None."""
        v = self._data.get(key) if self.enabled else None
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
        return v

    def put(self, key: str, seconds: float) -> None:
        """Record a measurement (kept in memory until :meth:`save`)."""
        if self.enabled:
            self._data[key] = float(seconds)
            self._dirty = True

    def __len__(self) -> int:
        return len(self._data)

    def save(self) -> None:
        """Write the cache (atomically: a concurrent reader sees the old or the new file)."""
        if not (self.enabled and self._dirty):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Merge with what another process may have written meanwhile.
            merged = {}
            if self.path.exists():
                try:
                    old = json.loads(self.path.read_text())
                    if isinstance(old, dict):
                        merged.update(old)
                except (ValueError, OSError):
                    pass
            merged.update(self._data)
            fd, tmp = tempfile.mkstemp(dir=str(self.path.parent), prefix=".autotune-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:
                os.unlink(tmp)  # a failed write leaves no temporary file behind
                raise
            self._dirty = False
        except OSError as e:
            warnings.warn(f"sparse_compile: could not write autotune cache {self.path} ({e})")
