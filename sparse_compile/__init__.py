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
from .inspection import inspect  # noqa: E402

# Public names served lazily so that `import sparse_compile` stays cheap and the heavier parts
# (FX passes, trainer, theory) load only when used.
_LAZY = {
    "SRigL": "sparse_compile.trainer",
    "RigL": "sparse_compile.trainer",
    "StaticSparse": "sparse_compile.trainer",
    "optimize": "sparse_compile.compiler",
    "OptimizeConfig": "sparse_compile.compiler",
    "save": "sparse_compile.serialize",
    "load": "sparse_compile.serialize",
    "flops": "sparse_compile.flop_count",
    "theory": "sparse_compile.theory",
    "models": "sparse_compile.models",
}

__all__ = ["__version__", "formats", "kernels", "inspect", *_LAZY]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'sparse_compile' has no attribute {name!r}")
    m = importlib.import_module(mod)
    value = m if m.__name__.rsplit(".", 1)[-1] == name else getattr(m, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
