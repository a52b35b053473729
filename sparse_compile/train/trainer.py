"""Dynamic sparse training: :class:`SRigL`, :class:`RigL` and the :class:`StaticSparse` baseline.

Usage (all three share it)::

    sparsifier = SRigL(model, optimizer, sparsity=0.9, total_steps=T)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()
        sparsifier.step()      # topology update every delta_t steps; keeps masked weights at 0
        optimizer.zero_grad()

How the masks are kept:

* every sparse module gets a bool buffer ``weight_mask`` (so ``model.state_dict()`` holds the masks
  and :func:`sparse_compile.formats.get_mask` reads them);
* a post-accumulate-grad hook zeroes the gradient outside the mask as soon as it is accumulated, so
  gradient clipping sees the sparse gradient and no optimizer (SGD with momentum and weight decay,
  Adam, AdamW, ...) ever moves a masked weight: those stay exactly 0.0 after ``optimizer.step()``;
* optimizer state (momentum, Adam moments: every state tensor of the parameter's shape) is zeroed for
  weights pruned or grown at an update, and ``step()`` re-applies the masks to the weights as a cheap
  guard against optimizers that write everywhere;
* during the ``grad_accumulation`` steps before an update, a tensor hook also sums the *dense*
  gradient (every micro-batch backward of those steps); the update uses its mean per step. Under
  ``torch.distributed`` it is all-reduced and the new masks are broadcast from rank 0, so every rank
  holds the same masks.

Differences from the reference implementation, following the paper (Lasby et al., ICLR 2024): sparse init
std is ``sqrt(2/k)``; Adam/AdamW moments are reset along with SGD momentum.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .budgets import DISTRIBUTIONS, fan_in_dense, layer_budgets, layer_densities, sparse_init_
from .discovery import Discovery, Target, discover
from .distributed import masks_from_rank0, sum_over_ranks_, world_size
from .layers import _check_frac, _check_int, _Layer, _nnz, _row_nnz, _zero_outside
from .report import MaskStats, SparsityReport
from .state_checks import validate_state


__all__ = ["SparseTrainer", "SparsityReport", "MaskStats"]

_STATE_VERSION = 1


class SparseTrainer:
    """Shared machinery of :class:`SRigL`, :class:`RigL` and :class:`StaticSparse`.

    Args:
        model: the model (may be wrapped in DistributedDataParallel or torch.compile); its Linear and
            Conv2d weights are found by FX tracing (see :func:`sparse_compile.train.discovery.discover`).
        optimizer: the optimizer over the model's parameters (its state is reset for pruned/grown
            weights), or None.
        sparsity: target global sparsity over the sparse layers, in [0, 1).
        total_steps: optimizer steps of the whole run (for the drop-fraction schedule).
        delta_t: steps between topology updates.
        alpha: initial drop fraction, cosine-decayed to 0 at ``t_end * total_steps``.
        t_end: fraction of the run after which the topology is frozen.
        distribution: ``"erk"`` or ``"uniform"`` layer-wise sparsity (:func:`layer_densities`).
        grad_accumulation: number of steps before an update whose dense gradients are averaged.
        dense_first, dense_qkv, exclude, head, leaf_modules: layer selection, see ``discover``.
        init: re-initialise the budgeted weights with the sparse Kaiming init (std sqrt(2/k)); with
            False the current weights are only masked.
    """

    method = "SparseTrainer"
    dynamic = True  # False: the topology never changes

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        sparsity: float = 0.9,
        total_steps: Optional[int] = None,
        delta_t: int = 100,
        alpha: float = 0.3,
        t_end: float = 0.75,
        distribution: str = "erk",
        grad_accumulation: int = 1,
        *,
        dense_first: bool = False,
        dense_qkv: bool = True,
        exclude: Union[str, Iterable[str]] = (),
        head: Optional[Union[str, Iterable[str]]] = None,
        init: bool = True,
        leaf_modules: Iterable[type] = (),
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.delta_t = _check_int("delta_t", delta_t)
        self.alpha = _check_frac("alpha", alpha)
        self.t_end = _check_frac("t_end", t_end)
        self.grad_accumulation = _check_int("grad_accumulation", grad_accumulation)
        if self.grad_accumulation > self.delta_t:
            raise ValueError(f"grad_accumulation ({grad_accumulation}) cannot exceed delta_t ({delta_t})")
        if total_steps is None:
            if self.dynamic:
                raise ValueError(f"{self.method} needs total_steps (the run's number of optimizer steps)")
        else:
            _check_int("total_steps", total_steps)
        self.model = model
        self.optimizer = optimizer
        self.sparsity_target = float(sparsity)
        self.total_steps = total_steps
        self.distribution = distribution

        disc: Discovery = discover(
            model, dense_first=dense_first, dense_qkv=dense_qkv, exclude=exclude, head=head,
            leaf_modules=leaf_modules,
        )
        self.discovery = disc
        for t in disc.targets:
            if hasattr(t.module, f"{t.param_name}_mask"):
                raise ValueError(
                    f"layer {t.name!r} already has a '{t.param_name}_mask' attribute, from another sparsifier "
                    f"(a model keeps its masks after .remove()) or torch.nn.utils.prune; delete it "
                    f"(del module.{t.param_name}_mask, or prune.remove) to start over"
                )
        for t in disc.targets:
            if not t.param.requires_grad:
                raise ValueError(
                    f"layer {t.name!r}: its {t.param_name!r} does not require grad (frozen), so its dense "
                    f"gradient cannot be observed; unfreeze it or leave it out (exclude={[t.name]!r})"
                )
        self._shapes = {t.name: tuple(t.param.shape) for t in disc.targets}
        self._densities = layer_densities(
            self._shapes, self.sparsity_target, distribution, dense=[t.name for t in disc.targets if t.dense]
        )
        budgets = layer_budgets(self._shapes, self._densities, constant=True)
        self._targets = disc.targets
        self._layers: list[_Layer] = []
        self._dense_targets: list[Target] = []
        with torch.no_grad():
            for t in disc.targets:
                p = t.param
                if budgets[t.name] >= p.numel():
                    self._dense_targets.append(t)
                    if init:
                        sparse_init_(p)
                    continue
                layer = _Layer(t, budgets[t.name])
                mask = self._initial_mask(layer).to(p.device)
                t.module.register_buffer(layer.mask_name, mask)
                layer.ever = mask.clone()
                if init:
                    sparse_init_(p, mask)
                else:
                    _zero_outside(p, mask)
                self._layers.append(layer)
        self._step = 0
        self._updates = 0
        self._acc_steps = 0
        self._history: list = []
        self._accumulating = self.dynamic and self._in_window(1)
        self._hooks_on = False
        self._install_hooks()
        self._record_history(alpha=0.0)
        # Call-order guard: step() must follow optimizer.step(). Called before it, an update's pruned
        # weights keep their gradient and momentum, and the optimizer moves them off their masks.
        self._opt_steps = 0  # optimizer.step() calls since the last step()
        self._mask_after_opt = False  # set once the wrong order is seen: masks re-applied after each
        self._order_hook = None if optimizer is None else optimizer.register_step_post_hook(self._after_opt_step)

    # ------------------------------------------------------------------------------- schedule
    @property
    def t_end_step(self) -> int:
        """Last step (exclusive) at which the topology may change."""
        return int(self.t_end * self.total_steps) if self.total_steps else 0

    def is_update_step(self, step: int) -> bool:
        """True if the topology is updated when ``step()`` is called for the ``step``-th time."""
        return self.dynamic and step > 0 and step % self.delta_t == 0 and step < self.t_end_step

    def drop_fraction(self, step: int) -> float:
        """Cosine-decayed drop fraction ``alpha/2 * (1 + cos(pi * step / t_end_step))``."""
        if not self.t_end_step:
            return 0.0
        return self.alpha / 2 * (1 + math.cos(math.pi * min(step, self.t_end_step) / self.t_end_step))

    def _in_window(self, step: int) -> bool:
        # Dense gradients are collected for the grad_accumulation steps ending at an update step.
        nxt = -(-step // self.delta_t) * self.delta_t
        return nxt - step < self.grad_accumulation and self.is_update_step(nxt)

    # ---------------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        for layer in self._layers:
            p = layer.param
            layer.handles.append(p.register_hook(self._dense_grad_hook(layer)))
            layer.handles.append(p.register_post_accumulate_grad_hook(self._mask_grad_hook(layer)))
        self._hooks_on = True

    def _dense_grad_hook(self, layer: _Layer):
        def hook(grad: torch.Tensor):
            if self._accumulating:
                g = grad.detach()
                if layer.dense_grad is None:
                    layer.dense_grad = g.to(torch.float32, copy=True)
                else:
                    layer.dense_grad.add_(g)
            return None

        return hook

    def _mask_grad_hook(self, layer: _Layer):
        def hook(p: torch.Tensor):
            if p.grad is not None:
                _zero_outside(p.grad, layer.mask)

        return hook

    def _after_opt_step(self, optimizer, args, kwargs) -> None:
        self._opt_steps += 1
        if self._mask_after_opt:
            self.apply_masks()

    def _check_order(self) -> None:
        if self.optimizer is None or self._opt_steps > 0 or self._mask_after_opt:
            return
        self._mask_after_opt = True
        warnings.warn(
            f"{self.method}.step() was called without an optimizer.step() before it (at step {self._step + 1}): "
            "call it after optimizer.step(), otherwise each topology update's pruned weights are moved off their "
            "masks by the optimizer. From now on the masks are also re-applied after every optimizer.step(), "
            "which keeps the weights inside them. (An optimizer step skipped on purpose, e.g. by a GradScaler "
            "after an overflow, also triggers this warning.)",
            stacklevel=3,
        )

    def remove(self) -> None:
        """Stop managing the model: remove the gradient hooks. The mask buffers stay on the model."""
        if self._order_hook is not None:
            self._order_hook.remove()
            self._order_hook = None
        for layer in self._layers:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
        self._hooks_on = False

    # ---------------------------------------------------------------------------------- masks
    def _initial_mask(self, layer: _Layer) -> torch.Tensor:
        raise NotImplementedError

    def _mask_problem(self, layer: _Layer, mask: torch.Tensor) -> Optional[str]:
        """Why ``mask`` (e.g. from a checkpoint) cannot be this method's mask of ``layer``, or None."""
        n = _nnz(mask)
        if n > layer.budget:
            return f"has {n} live weights, over the layer's budget of {layer.budget}"
        return None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name (as in ``model.named_parameters()``) -> its bool mask buffer."""
        return {layer.target.param_key: layer.mask for layer in self._layers}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every weight outside its mask (in place)."""
        for layer in self._layers:
            _zero_outside(layer.param, layer.mask)

    # ----------------------------------------------------------------------------------- step
    def step(self) -> None:
        """Call once per optimizer step, after ``optimizer.step()``.

        Updates the topology when due, otherwise re-applies the masks.
        """
        if not self._hooks_on:
            raise RuntimeError(f"{self.method}.step() after remove()")
        self._check_order()
        self._opt_steps = 0
        if self._accumulating:
            self._acc_steps += 1
        self._step += 1
        if self.is_update_step(self._step):
            self._update(self._step)
        else:
            self.apply_masks()
        self._accumulating = self.dynamic and self._in_window(self._step + 1)

    @torch.no_grad()
    def _update(self, step: int) -> None:
        alpha_t = self.drop_fraction(step)
        n_acc = max(1, self._acc_steps)
        layers = [layer for layer in self._layers if layer.dense_grad is not None]
        for layer in self._layers:
            layer.last_drop = 0.0
        world = world_size()
        if world > 1 and layers:
            sum_over_ranks_([layer.dense_grad for layer in layers])
            n_acc *= world
        bad = [layer.name for layer in layers if not torch.isfinite(layer.dense_grad.sum())]  # any inf/nan
        if bad:
            # Regrowth ranks positions by |gradient|: with inf/NaN in it the ranking is meaningless, so
            # the topology stays as it is (every rank sees the same all-reduced gradient and skips too).
            warnings.warn(f"{self.method}: skipped the topology update at step {step}: the dense gradient is "
                          f"not finite (inf or NaN) in layer(s) {bad}; masks unchanged", stacklevel=3)
            for layer in self._layers:
                layer.dense_grad = None
            self._acc_steps = 0
            self.apply_masks()
            return
        self._fresh = {}  # layer name -> its new mask, as soon as decided (a rule may read a consumer's)
        for layer in self._update_order(layers):
            g = layer.dense_grad.div_(n_acc)
            w2 = layer.param.detach().reshape(layer.out, -1).float()
            m2 = layer.mask.reshape(layer.out, -1)
            new = self._new_mask(layer, w2, m2, g.reshape(layer.out, -1).to(w2.device), alpha_t)
            self._fresh[layer.name] = new.reshape(layer.mask.shape)
        new_masks = [self._fresh.pop(layer.name) for layer in layers]
        if world > 1 and layers:
            new_masks = masks_from_rank0(new_masks)
        for layer, new in zip(layers, new_masks):
            self._apply_new_mask(layer, new)
        for layer in self._layers:
            layer.dense_grad = None
        self._acc_steps = 0
        self.apply_masks()
        self._updates += 1
        self._record_history(alpha=alpha_t)

    def _new_mask(self, layer: _Layer, w2, m2, g2, alpha_t: float) -> torch.Tensor:
        raise NotImplementedError

    def _update_order(self, layers: list) -> list:
        """Order in which an update decides the layers' new masks (execution order by default)."""
        return layers

    def _apply_new_mask(self, layer: _Layer, new: torch.Tensor) -> None:
        old = layer.mask
        survive = old & new
        n_old = _nnz(old)
        layer.last_drop = (n_old - _nnz(survive)) / n_old if n_old else 0.0
        p = layer.param
        # Pruned weights go to 0; grown ones start at 0 (they were 0); a weight dropped and regrown
        # in the same update keeps its value and its optimizer state.
        _zero_outside(p, survive)
        if self.optimizer is not None:
            for v in self.optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    _zero_outside(v, survive)
        old.copy_(new)
        layer.ever = layer.ever.to(new.device)
        layer.ever |= new

    # --------------------------------------------------------------------------------- report
    def _layer_itops(self) -> dict[str, float]:
        out = {layer.name: _nnz(layer.ever) / layer.ever.numel() for layer in self._layers}
        out.update({t.name: 1.0 for t in self._dense_targets})
        return out

    def _record_history(self, alpha: float) -> None:
        itops = self._layer_itops()
        ever = sum(_nnz(layer.ever) for layer in self._layers) + sum(t.param.numel() for t in self._dense_targets)
        total = sum(math.prod(s) for s in self._shapes.values())
        ablated = sum(layer.out - _nnz(_row_nnz(layer.mask)) for layer in self._layers)
        self._history.append({
            "step": self._step,
            "itop": ever / total,
            "layers": {t.name: itops[t.name] for t in self._targets},
            "alpha": alpha,
            "sparsity": self.sparsity,
            "ablated": ablated,
        })

    @property
    def step_count(self) -> int:
        """Number of ``step()`` calls so far."""
        return self._step

    @property
    def sparsity(self) -> float:
        """Exact global sparsity now, over every layer in the budget."""
        total = sum(math.prod(s) for s in self._shapes.values())
        live = sum(_nnz(layer.mask) for layer in self._layers) + sum(t.param.numel() for t in self._dense_targets)
        return 1.0 - live / total

    def report(self) -> SparsityReport:
        """Per-layer and global state (see :class:`SparsityReport`)."""
        itops = self._layer_itops()
        by_name = {layer.name: layer for layer in self._layers}
        recs = []
        for t in self._targets:
            shape = self._shapes[t.name]
            kind = "linear" if isinstance(t.module, nn.Linear) and t.param_name == "weight" else (
                "conv2d" if isinstance(t.module, nn.Conv2d) else "param")
            fd = fan_in_dense(shape)
            layer = by_name.get(t.name)
            if layer is None:
                recs.append(MaskStats(t.name, kind, shape, fd, fd, fd, shape[0], 0, math.prod(shape),
                                       math.prod(shape), 0.0, 0.0, 1.0, t.head, True))
                continue
            fan = _row_nnz(layer.mask).cpu()
            act = fan[fan > 0]
            nnz = int(fan.sum())
            recs.append(MaskStats(
                t.name, kind, shape, fd, int(act.min()) if act.numel() else 0, int(act.max()) if act.numel() else 0,
                int(act.numel()), layer.out - int(act.numel()), nnz, layer.budget, 1.0 - nnz / math.prod(shape),
                layer.last_drop, itops[t.name], t.head, False,
            ))
        return SparsityReport(
            method=self.method, step=self._step, total_steps=self.total_steps, updates=self._updates,
            target_sparsity=self.sparsity_target, sparsity=self.sparsity, itop=self._history[-1]["itop"],
            active=sum(r.active for r in recs), ablated=sum(r.ablated for r in recs), layers=recs,
            skipped=dict(self.discovery.skipped), history=[dict(h) for h in self._history],
        )

    # ----------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically (masks included, though the model's own
        state dict holds them too)."""
        return {
            "version": _STATE_VERSION,
            "method": self.method,
            "step": self._step,
            "updates": self._updates,
            "acc_steps": self._acc_steps,
            "history": [dict(h) for h in self._history],
            "layers": {
                layer.name: {
                    "mask": layer.mask.detach().cpu().clone(),
                    "ever": layer.ever.detach().cpu().clone(),
                    "dense_grad": None if layer.dense_grad is None else layer.dense_grad.detach().cpu().clone(),
                    "budget": layer.budget,
                    "last_drop": layer.last_drop,
                }
                for layer in self._layers
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output. Checks everything before changing anything."""
        validate_state(self, state, _STATE_VERSION)
        for layer in self._layers:
            s = state["layers"][layer.name]
            dev = layer.mask.device
            layer.mask.copy_(s["mask"].to(dev))
            layer.ever = s["ever"].to(dev).clone()
            layer.dense_grad = None if s["dense_grad"] is None else s["dense_grad"].to(dev).clone()
            layer.last_drop = float(s["last_drop"])
        self._step = int(state["step"])
        self._updates = int(state["updates"])
        self._acc_steps = int(state["acc_steps"])
        self._history = [dict(h) for h in state["history"]]
        self._accumulating = self.dynamic and self._in_window(self._step + 1)
        self.apply_masks()

    def __repr__(self) -> str:
        return (f"{self.method}(layers={len(self._layers)}, sparsity={self.sparsity:.4f}, step={self._step}, "
                f"delta_t={self.delta_t}, total_steps={self.total_steps})")
