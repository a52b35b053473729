"""How far one output is from a reference: the one relative error every check and benchmark uses.

Semantics of :func:`relative_error` (normwise, so a reference entry near zero cannot blow it up the
way an element-wise ratio would):

* per tensor, ``max|a - b| / max|b|`` computed in float64 (``b`` is the reference);
* a reference that is all zero gives 0 when ``a`` is all zero too, else ``inf``;
* a NaN anywhere in ``a - b`` (in either tensor) gives ``inf``: never "close";
* an empty tensor contributes 0;
* ``a`` and ``b`` may be nested outputs (tuples, lists, dicts): the result is the largest error over
  their tensor leaves; a non-tensor leaf (an int, a string) counts as ``inf`` when the two differ.
  Leaves differing in number or a tensor pair differing in shape raise ``ValueError``: that is a
  different output, not a less accurate one.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

__all__ = ["relative_error"]


def relative_error(a, b) -> float:
    """``max|a - b| / max|b|`` in float64, over every tensor leaf of ``a`` and the reference ``b``.

    See the module docstring for the zero-reference, NaN, empty and nested-output cases.
    """
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"outputs differ in structure: {len(la)} vs {len(lb)} leaves")
    err = 0.0
    for x, y in zip(la, lb):
        if not isinstance(y, Tensor):
            if x != y:
                return float("inf")
            continue
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if y.numel() == 0:
            continue
        y64 = y.detach().to(torch.float64)
        x64 = x.detach().to(device=y64.device, dtype=torch.float64)
        den = float(y64.abs().max())
        num = float((x64 - y64).abs().max())
        if num != num:  # NaN
            return float("inf")
        err = max(err, num / den if den > 0 else (0.0 if num == 0 else float("inf")))
    return err
