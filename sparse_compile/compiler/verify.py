"""How close two outputs are, and how close they must be (per layer and end to end, by dtype)."""
from __future__ import annotations

import torch

from ..numerics import relative_error  # noqa: F401  (the one implementation; re-exported for compiler callers)


def _default_rtol(dtype, layer: bool) -> float:
    if dtype == torch.float64:
        return 1e-10 if layer else 1e-8
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2 if layer else 5e-2
    return 1e-5 if layer else 1e-4
