"""The three update rules: :class:`StaticSparse`, :class:`RigL` and :class:`SRigL`."""
from __future__ import annotations

import math

import torch

from . import budget_rules
from .budgets import random_constant_fan_in_mask, random_mask
from .layers import _check_frac, _Layer, _nnz, _row_nnz
from .trainer import SparseTrainer


def _top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape with True at its ``n`` largest entries (layer-wide)."""
    m = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n > 0:
        m[torch.topk(scores.reshape(-1), n, sorted=False).indices] = True
    return m.reshape(scores.shape)


def _drop_smallest(aw: torch.Tensor, live: torch.Tensor, n: int) -> torch.Tensor:
    """``live`` without its ``n`` smallest-magnitude entries (layer-wide).

    Selecting among the live entries only keeps the top-k small: they are a fraction of the layer.
    """
    keep = live.clone()
    if n > 0:
        pos = torch.nonzero(live.reshape(-1)).flatten()
        drop = torch.topk(aw.reshape(-1)[pos], n, largest=False, sorted=False).indices
        keep.view(-1)[pos[drop]] = False
    return keep


class _SameArguments(SparseTrainer):
    """The constructor all three methods share, SRigL's, so that one is swapped for another by name.

    ``gamma_sal`` (SRigL's ablation threshold) is validated by every method and used only by SRigL.
    """

    def __init__(self, model, optimizer, sparsity=0.9, total_steps=None, delta_t=100, alpha=0.3, t_end=0.75,
                 gamma_sal: float = 0.3, distribution="erk", grad_accumulation=1, **kw):
        self.gamma_sal = _check_frac("gamma_sal", gamma_sal, lo_open=False)
        super().__init__(model, optimizer, sparsity, total_steps, delta_t, alpha, t_end, distribution,
                         grad_accumulation, **kw)


class StaticSparse(_SameArguments):
    """Random constant fan-in masks, never updated (the static sparse baseline).

    Same arguments as :class:`SRigL`; the update schedule ones (``total_steps``, ``delta_t``,
    ``alpha``, ``t_end``, ``grad_accumulation``) and ``gamma_sal`` are accepted and unused.
    """

    method = "StaticSparse"
    dynamic = False

    def _initial_mask(self, layer: _Layer) -> torch.Tensor:
        return random_constant_fan_in_mask(layer.param.shape, layer.budget // layer.out)

    def _mask_problem(self, layer, mask):
        k = layer.budget // layer.out
        if not bool((_row_nnz(mask) == k).all()):
            return f"does not have {k} live weights in every neuron (StaticSparse never changes its masks)"
        return None


class RigL(_SameArguments):
    """RigL (Evci et al. 2020): unstructured masks; prune by |w|, regrow by |dense grad|, layer-wide.

    Each layer has the same number of weights as under SRigL (``out * k``), placed at random at start,
    so the two are compared at equal parameter counts. Same arguments as :class:`SRigL`;
    ``gamma_sal`` is accepted and unused (RigL ablates no neuron).
    """

    method = "RigL"

    def _initial_mask(self, layer: _Layer) -> torch.Tensor:
        return random_mask(layer.param.shape, layer.budget)

    def _mask_problem(self, layer, mask):
        n = _nnz(mask)
        if n > layer.budget:
            return super()._mask_problem(layer, mask)
        return None if n == layer.budget else f"has {n} live weights; RigL keeps exactly the budget, {layer.budget}"

    def _new_mask(self, layer, w2, m2, g2, alpha_t):
        n_prune = int(alpha_t * _nnz(m2))
        keep = _drop_smallest(w2.abs(), m2, n_prune)
        return keep | _top_mask(torch.where(keep, -1.0, g2.abs().float()), n_prune)


class SRigL(_SameArguments):
    """SRigL (Lasby et al. 2024): RigL with constant fan-in per neuron and dynamic neuron ablation.

    Extra argument ``gamma_sal`` (default 0.3; the paper uses 0.95 for ViT): a neuron with fewer than
    ``max(1, floor(gamma_sal * k))`` salient weights (kept by magnitude or among the layer's regrowth
    candidates) is ablated and its budget goes to the other neurons. ``gamma_sal=0`` disables
    ablation. The output layer(s) are never ablated.

    Two opt-in rules beyond the paper stop the budget from being wasted at high sparsity (both off by
    default, so ``SRigL(...)`` is the paper's method; see :mod:`sparse_compile.train.budget_rules`):

    * ``ablate_dead_ends=True``: a neuron none of whose outputs is read by a live weight of the sparse
      layer(s) that consume it (after their own update at this step) is not salient: it is ablated.
      Consumers are found in the FX graph (through activations, BatchNorm, pooling, flatten) once, at
      the first forward, which also runs the model once in eval mode under ``no_grad`` to learn the
      shapes. A layer whose output also reaches anything else (a residual add, the output, a dense
      layer) is not judged. Needs an FX-traceable model.
    * ``skip_zero_grad=True``: a position whose dense gradient is exactly 0 is never regrown (such a
      weight would never move); neurons that cannot fill their fan-in ``k`` with kept weights and
      non-zero-gradient positions are ablated as long as that raises the number of such weights the
      layer holds (each ablation raises ``k`` for the rest; see
      :func:`~sparse_compile.train.budget_rules.ablate_unfillable`). Neurons still short of ``k``, and
      the output layer(s), regrow zero-gradient positions for the rest.

    Freed budget goes to the remaining neurons as with the paper's ablation: constant fan-in
    ``k = budget // active`` among active neurons, the same budget, the output layer(s) never ablated.
    """

    method = "SRigL"

    def __init__(self, model, optimizer, sparsity=0.9, total_steps=None, delta_t=100, alpha=0.3, t_end=0.75,
                 gamma_sal: float = 0.3, distribution="erk", grad_accumulation=1, *,
                 ablate_dead_ends: bool = False, skip_zero_grad: bool = False, **kw):
        for name, v in (("ablate_dead_ends", ablate_dead_ends), ("skip_zero_grad", skip_zero_grad)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be True or False, got {v!r}")
        self.ablate_dead_ends = ablate_dead_ends
        self.skip_zero_grad = skip_zero_grad
        self._edges: dict = {}
        self._edge_hook = None
        super().__init__(model, optimizer, sparsity, total_steps, delta_t, alpha, t_end, gamma_sal, distribution,
                         grad_accumulation, **kw)
        if ablate_dead_ends:
            budget_rules.install_edge_tracing(self, kw.get("leaf_modules", ()))

    def remove(self) -> None:
        """Stop managing the model (see :meth:`SparseTrainer.remove`)."""
        if self._edge_hook is not None:
            self._edge_hook.remove()
            self._edge_hook = None
        super().remove()

    def _update_order(self, layers):
        # Consumers first: the dead-end rule reads a consumer's new mask.
        return layers[::-1] if self.ablate_dead_ends else layers

    def _initial_mask(self, layer: _Layer) -> torch.Tensor:
        return random_constant_fan_in_mask(layer.param.shape, layer.budget // layer.out)

    def _mask_problem(self, layer, mask):
        problem = super()._mask_problem(layer, mask)
        if problem:
            return problem
        fan = _row_nnz(mask)
        act = fan[fan > 0]
        if act.numel() == 0:
            return "has no live weight"
        if layer.target.head and act.numel() < layer.out:
            return f"ablates {layer.out - act.numel()} neuron(s) of an output layer (never ablated)"
        k = layer.budget // act.numel()
        if not bool((act == k).all()):
            return (f"has fan-in {int(act.min())}-{int(act.max())} over its {act.numel()} active neurons; SRigL's "
                    f"is constant, budget // active = {k}")
        return None

    def _new_mask(self, layer, w2, m2, g2, alpha_t):
        out, fan = m2.shape
        row_nnz = _row_nnz(m2)
        k_now = int(row_nnz.max())
        n_prune = int(alpha_t * int(row_nnz.sum()))
        aw = w2.abs()
        ag = g2.abs().float()
        keep = _drop_smallest(aw, m2, n_prune)
        grow = _top_mask(torch.where(keep, -1.0, ag), n_prune)
        if self.skip_zero_grad:
            grow &= ag > 0

        active = torch.ones(out, dtype=torch.bool, device=m2.device)
        dead = budget_rules.layer_dead_ends(self, layer) if self.ablate_dead_ends else None
        if (self.gamma_sal > 0 or dead is not None) and not layer.target.head:
            salient = _row_nnz(keep | grow)
            if self.gamma_sal > 0:
                active = salient >= max(1, math.floor(self.gamma_sal * k_now))
            prio = salient
            if dead is not None:
                active &= ~dead
                prio = salient + (~dead) * (fan + 1)  # bring back dead ends last
            # Never ablate so many neurons that the fan-in would exceed the dense fan-in: bring back
            # the most salient ablated ones (lowest index first among ties).
            need = -(-layer.budget // fan) - _nnz(active)
            if need > 0:
                order = torch.sort(torch.where(active, -1, prio), descending=True, stable=True).indices
                active[order[:need]] = True
        if self.skip_zero_grad and not layer.target.head:
            active = budget_rules.ablate_unfillable(active, keep, ag, layer.budget, -(-layer.budget // fan))
        all_rows = _nnz(active) == out
        rows = torch.nonzero(active).flatten()
        k = layer.budget // rows.numel()
        keep_a = keep if all_rows else keep[rows]
        c = _row_nnz(keep_a)
        new_rows = keep_a.clone()
        # A neuron that kept more than k weights keeps its k largest ...
        over = torch.nonzero(c > k).flatten()
        if over.numel():
            sub = torch.where(keep_a[over], aw[rows[over]], -1.0)
            new_rows[over] = torch.zeros_like(new_rows[over]).scatter_(1, torch.topk(sub, k, dim=1).indices, True)
        # ... one with fewer grows its largest dense gradients among its other positions up to k.
        need = (k - c).clamp(min=0)
        kk = int(need.max())
        if kk > 0:
            score = torch.where(keep_a, -1.0, ag if all_rows else ag[rows])
            idx = torch.topk(score, kk, dim=1).indices
            take = torch.arange(kk, device=m2.device)[None, :] < need[:, None]
            new_rows |= torch.zeros_like(new_rows).scatter_(1, idx, take)
        if all_rows:
            return new_rows
        new = torch.zeros_like(m2)
        new[rows] = new_rows
        return new
