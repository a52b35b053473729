"""sparse_compile: run SRigL constant fan-in sparse networks fast.

Train with :class:`SRigL`, then ``optimize(model)`` rewrites each sparse Linear/Conv2d into the
fastest of dense, ablated-dense, condensed and CSR. Importing the package registers the
``torch.ops.sparse_compile`` custom ops.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from . import formats  # noqa: E402  (the foundation every other module reads weights through)
from . import kernels  # noqa: E402,F401  (registers torch.ops.sparse_compile.*)
from .analysis.inspect import inspect  # noqa: E402

# Public names served lazily so that `import sparse_compile` stays cheap and the heavier parts
# (FX passes, trainer, theory) load only when used.
_LAZY = {  # public name -> (module, attribute; None serves the module itself)
    "SRigL": ("sparse_compile.train", "SRigL"),
    "RigL": ("sparse_compile.train", "RigL"),
    "StaticSparse": ("sparse_compile.train", "StaticSparse"),
    "optimize": ("sparse_compile.compiler", "optimize"),
    "OptimizeConfig": ("sparse_compile.compiler", "OptimizeConfig"),
    "register_form": ("sparse_compile.compiler", "register_form"),
    "save": ("sparse_compile.compiler.serialize", "save"),
    "load": ("sparse_compile.compiler.serialize", "load"),
    "load_checkpoint": ("sparse_compile.checkpoint", "load_checkpoint"),
    "flops": ("sparse_compile.analysis.flops", "flops"),
    "theory": ("sparse_compile.analysis.theory", None),
    "models": ("sparse_compile.models", None),
}

__all__ = ["__version__", "formats", "kernels", "inspect", *_LAZY]


def __getattr__(name: str):
    spec = _LAZY.get(name)
    if spec is None:
        raise AttributeError(f"module 'sparse_compile' has no attribute {name!r}")
    m = importlib.import_module(spec[0])
    value = m if spec[1] is None else getattr(m, spec[1])
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
