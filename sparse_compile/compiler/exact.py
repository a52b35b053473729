"""``optimize`` must never silently change a model: which layers it understands exactly, and, with
example inputs, the layers at fault when the rewritten model differs from the original (found by
bisection over the per-layer decisions, kept as they were, named in a warning)."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

from torch import nn
from torch.nn.utils import prune

#: The reason a layer is kept because rewriting it changed the model's output (the bisection's verdict).
FAULT_REASON = "rewriting it changed the model's output on the example inputs (found by bisection)"

#: Most rebuilds the bisection may spend before it gives up and keeps every rewritten layer as it was.
MAX_BUILDS = 64


def _hooks(m: nn.Module) -> list:
    """Forward hooks and pre-hooks of ``m`` that a replacement module would silently drop.

    ``torch.nn.utils.prune``'s pre-hook only recomputes ``weight = weight_orig * weight_mask``,
    which the rewrite reads (after :func:`refresh_pruned`), so it is understood.
    """
    pre = [h for h in m._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
    return list(m._forward_hooks.values()) + pre


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks / pre-hooks (other than pruning's); FX would drop them when
    tracing through ``m``, so the compiler makes such modules leaves."""
    return bool(_hooks(m))


def make_leaf(m: nn.Module) -> bool:
    """Whether FX must call ``m`` rather than trace into it: it has hooks (tracing would drop
    them), or it is a Linear / Conv2d subclass the compiler does not understand (so it shows in
    the report, kept as it is, instead of vanishing into the graph)."""
    return has_hooks(m) or (isinstance(m, (nn.Linear, nn.Conv2d)) and not_understood(m) is not None)


def refresh_pruned(m: nn.Module) -> None:
    """Recompute a ``torch.nn.utils.prune``-d weight from ``weight_orig`` and its mask, as the
    module's own pre-hook does before each forward (the attribute may be stale)."""
    for h in m._forward_pre_hooks.values():
        if isinstance(h, prune.BasePruningMethod):
            h(m, None)


def reads_child_tensors(parent: nn.Module, child: str) -> bool:
    """Whether ``parent``'s ``forward`` source mentions ``self.<child>.weight`` / ``.bias`` (e.g.
    timm's PositionalEncodingFourier reads its projection's ``weight.dtype``): a replacement
    without that attribute, or with another shape, would break it. Conservative: no source, no."""
    import inspect

    try:
        src = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return False
    return f".{child}.weight" in src or f".{child}.bias" in src


#: Linear / Conv2d subclasses whose forward is, in eager mode, exactly their base class's.
_SAME_FORWARD = {
    "timm.layers.linear.Linear",  # casts the weight to the input dtype only under TorchScript
}


def not_understood(m: nn.Module) -> Optional[str]:
    """Why the compiler must keep Linear / Conv2d ``m`` as it is (None: its function is exactly
    ``F.linear`` / ``F.conv2d`` of its ``weight`` and ``bias``, so it may be rewritten)."""
    hooks = _hooks(m)
    if hooks:
        return f"it has {len(hooks)} forward hook(s) / pre-hook(s) that a replacement would drop"
    t = type(m)
    if f"{t.__module__}.{t.__qualname__}" in _SAME_FORWARD and "forward" in vars(t):
        return None
    if isinstance(m, nn.Linear):
        if type(m).forward is not nn.Linear.forward:
            return f"{type(m).__name__} overrides nn.Linear.forward"
        return None
    if isinstance(m, nn.Conv2d):
        if type(m).forward is not nn.Conv2d.forward or type(m)._conv_forward is not nn.Conv2d._conv_forward:
            return (f"{type(m).__name__} overrides nn.Conv2d.forward (e.g. weight standardisation or "
                    "padding computed in forward)")
        return None
    return f"{type(m).__name__} is not a Linear / Conv2d"


def build_exact(build: Callable, ok: Callable, cfg, warn_level: int = 4):
    """Build, and if the result differs from the original, find the layers at fault and keep them.

    ``build(keep)`` returns an optimized model in which the layers named in ``keep`` are kept as
    they were; ``ok(gm)`` says whether it matches the original on the example inputs. Without a
    mismatch this is one build. Otherwise, unless ``cfg.strict``, culprits are found one at a
    time: the smallest prefix (in graph order) of the rewritten layers whose rewriting breaks the
    model ends with a culprit (binary search, ``log2(n)`` builds each); it is kept and the search
    repeats until the model matches. A warning names the kept layers.
    """
    gm = build(frozenset())
    if ok(gm):
        return gm
    report = gm.sparse_compile_report
    if cfg.strict:
        raise RuntimeError(
            f"sparse_compile.optimize: the rewritten model differs from the original on the example inputs "
            f"(max relative error {report.verify_rel_err:.3e}); strict=True, so nothing is returned. Without "
            "strict, the layers at fault are found and kept as they were. Per-layer forms: "
            f"{[(r.name, r.form) for r in report]}"
        )
    # Every layer, dense ones included: a "dense" layer can still have been changed, by absorbing
    # its producer's ablated neurons (its input columns go), which is what breaks a parent reading
    # its weight.
    rewritten = [r.name for r in report]
    # Every layer, not only those rewritten now: "auto" may rewrite another one in a later build.
    every_layer = frozenset(r.name for r in report)
    everything = build(every_layer)
    if not ok(everything):
        raise RuntimeError(
            "sparse_compile.optimize: the model differs from the original on the example inputs even with every "
            f"layer kept as it was (max relative error {everything.sparse_compile_report.verify_rel_err:.3e}): "
            "tracing it with FX changed what it computes. Please report this with the model; pass "
            "leaf_modules=(...) naming the module types FX should not trace into as a workaround."
        )
    keep: set = set()
    remaining = list(rewritten)
    builds = 2
    while True:
        # Invariant: rewriting nothing of `remaining` is fine, rewriting all of it is not.
        lo, hi = 0, len(remaining)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            cand = build(frozenset(keep | set(remaining[mid:])))
            builds += 1
            if ok(cand):
                lo = mid
            else:
                hi = mid
        keep.add(remaining.pop(hi - 1))
        if builds >= MAX_BUILDS:
            keep |= set(remaining)
            remaining = []
        gm = build(frozenset(keep))
        builds += 1
        if ok(gm) or not remaining:
            break
    if not ok(gm):  # the bisection assumes culprits act alone (and "auto" decides alike each time)
        keep |= set(every_layer)
        gm = build(frozenset(keep))
        if not ok(gm):
            raise RuntimeError("sparse_compile.optimize: the model differs from the original with every layer kept")
    names = [r.name for r in report if r.name in keep]
    msg = (f"sparse_compile.optimize: {len(names)} layer(s) kept as they were because rewriting them changed "
           f"the model's output on the example inputs: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}; "
           "the rest is optimized (pass strict=True to raise instead)")
    warnings.warn(msg, stacklevel=warn_level)
    gm.sparse_compile_report.notes.append(msg)
    return gm

