"""What :func:`~sparse_compile.compiler.api.optimize` can be told: :class:`OptimizeConfig`, the modes."""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union


MODES = ("auto", "dense", "ablated_dense", "condensed", "csr")
#: Old names still accepted (with a FutureWarning) for one release.
DEPRECATED_NAMES = {"structured": "ablated_dense"}

CONFIG_VERSION = 1
#: Floating dtypes ``OptimizeConfig.dtype`` accepts (by torch's name).
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class OptimizeConfig:
    """Everything :func:`optimize` can be told. Serialisable (``to_dict`` / ``from_dict``), versioned.

    mode:            "auto", "dense", "ablated_dense", "condensed", "csr", or a dict from layer-name
                     pattern (fnmatch, first match wins) to one of those; unmatched layers stay dense.
    device:          where the result runs and "auto" measures (default: the model's device).
    auto_forms:      forms "auto" may choose besides the layer's dense / ablated-dense baseline.
    min_numel:       layers with fewer weights are not worth a sparse kernel: kept dense / ablated-dense.
    pad_condensed:   in "condensed" mode, pad a non-constant fan-in to its maximum instead of raising.
    max_pad_ratio:   in "auto", also try padded condensed when ``max fan-in * n / nnz`` is at most this.
    repeats, warmup: timing of "auto" (median of ``repeats`` runs after ``warmup`` calls).
    cache, cache_dir: the on-disk timing cache (default dir: ``$SPARSE_COMPILE_CACHE``).
    rtol:            per-layer relative error a form must meet to count as exact in "auto"
                     (default by dtype: 1e-5 fp32, 1e-2 bf16/fp16, 1e-10 fp64).
    verify_rtol:     end-to-end check on ``example_inputs``; a larger error raises (default by dtype:
                     1e-4 fp32, 5e-2 bf16/fp16, 1e-8 fp64). None in ``verify`` disables it.
    structural:      drop ablated neurons and propagate the removal (False: keep full width).
    whole_model_check: in mode "auto" (not in a dict of patterns), time whole models on the
                     example inputs: the per-layer result, every sparse layer condensed, the
                     original (and, if nothing beats it, the per-layer choice without structural
                     changes); keep the fastest (per-layer timings cannot see what a layer's
                     narrower output costs the next layer, or a scatter's memory traffic).
    leaf_modules:    extra module types FX must not trace into.
    requires_grad:   whether the new parameters require grad (for fine-tuning the optimized model).
    dtype:           run the optimized model in this floating dtype ("bfloat16", "float16",
                     "float32", "float64" or a torch.dtype; default: the model's own). The copy is cast
                     before tracing, so condensed layers get values in that dtype (bf16 on CPU: fp32
                     accumulation, VDPBF16PS where the CPU has AVX512_BF16) and dense layers use
                     torch's kernels for it; the returned model expects inputs in that dtype. Its
                     error against the model in its own dtype on ``example_inputs`` is reported as
                     ``report.error_vs_original_dtype``.
    strict:          with ``example_inputs``, raise when the rewritten model differs from the original.
                     By default the layers at fault are found (bisection over the per-layer
                     decisions), kept as they were and named in a warning; the rest is optimized.
    """

    mode: Union[str, dict] = "auto"
    device: Optional[str] = None
    auto_forms: tuple = ("ablated_dense", "condensed", "csr")
    min_numel: int = 2048
    pad_condensed: bool = False
    max_pad_ratio: float = 1.25
    repeats: int = 15
    warmup: int = 2
    cache: bool = True
    cache_dir: Optional[str] = None
    rtol: Optional[float] = None
    verify: bool = True
    verify_rtol: Optional[float] = None
    structural: bool = True
    whole_model_check: bool = True
    leaf_modules: tuple = ()
    requires_grad: bool = False
    dtype: Optional[str] = None
    strict: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self):
        from .forms import FORMS  # the registry reads the plan, which reads modes from here

        self.mode = _renamed(self.mode)
        self.auto_forms = tuple(_renamed(f) for f in self.auto_forms)
        _check_mode(self.mode)
        bad = [f for f in self.auto_forms if f not in FORMS or f == "dense"]
        if bad:
            raise ValueError(f"OptimizeConfig.auto_forms: unknown form(s) {bad}; known: {sorted(FORMS)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"OptimizeConfig: repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"OptimizeConfig version {self.version} is not supported (this is {CONFIG_VERSION})")
        self.auto_forms = tuple(self.auto_forms)
        self.leaf_modules = tuple(self.leaf_modules)
        if self.dtype is not None:
            name = str(self.dtype).replace("torch.", "")
            if name not in FLOAT_DTYPES:
                raise ValueError(f"OptimizeConfig.dtype: {self.dtype!r} is not one of {FLOAT_DTYPES}")
            self.dtype = name

    def to_dict(self) -> dict:
        """JSON-ready dict (``leaf_modules`` as qualified class names)."""
        d = asdict(self)
        d["auto_forms"] = list(self.auto_forms)
        d["leaf_modules"] = [f"{t.__module__}.{t.__qualname__}" for t in self.leaf_modules]
        if self.device is not None:
            d["device"] = str(self.device)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizeConfig":
        """Inverse of :meth:`to_dict` (``leaf_modules`` are not restored: they name code)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"OptimizeConfig: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        d.pop("leaf_modules", None)
        d["auto_forms"] = tuple(d.get("auto_forms", cls.auto_forms))
        return cls(**d)


def _renamed(mode):
    """``mode`` (a name, or a dict of pattern -> name) with deprecated names replaced, with a warning."""
    if isinstance(mode, dict):
        return {k: _renamed(v) for k, v in mode.items()}
    if isinstance(mode, str) and mode in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[mode]
        warnings.warn(f"sparse_compile.optimize: {mode!r} is now called {new!r}; the old name will be removed",
                      FutureWarning, stacklevel=4)
        return new
    return mode


def _check_mode(mode) -> None:
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"optimize: mode must be one of {MODES} or a dict of pattern -> mode, got {mode!r}")
    elif isinstance(mode, dict):
        for k, v in mode.items():
            if not isinstance(k, str) or v not in MODES:
                raise ValueError(f"optimize: mode dict entry {k!r}: {v!r} (modes: {MODES})")
    else:
        raise ValueError(f"optimize: mode must be a string or a dict, got {type(mode).__name__}")


def _mode_for(mode, name: str) -> str:
    if isinstance(mode, str):
        return mode
    for pat, m in mode.items():
        if fnmatch.fnmatchcase(name, pat):
            return m
    return "dense"
