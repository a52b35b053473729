"""Per-step overhead of the sparse trainers against dense training (CPU by default).

    .venv/bin/python bench/train.py                      # CIFAR ResNet-18, batch 32, SRigL
    .venv/bin/python bench/train.py --method rigl --steps 20
    .venv/bin/python bench/train.py --full               # literally delta_t steps of each (slow on CPU)

What is compared: one training step (forward, backward, ``optimizer.step()``, ``zero_grad``) of the
dense model, against the same step plus ``sparsifier.step()`` and its gradient hooks on an identical
sparse model. The sparse model still computes densely: the trainer's cost is the hooks, the mask
re-application and the topology update every ``delta_t`` steps.

The default mode times interleaved dense / sparse steps (so load changes on a shared machine hit
both alike) with a sparsifier whose updates come every ``--probe-every`` steps, so update steps and
ordinary steps are both sampled, and reports the cost averaged over ``delta_t`` steps as
``((delta_t - 1) * median(ordinary) + median(update)) / delta_t`` against ``median(dense)``. As
that difference of two noisy medians can be a few percent either way on a busy machine, it also
times the trainer's own work directly (the ``sparsifier.step()`` calls, and the gradient-mask
hooks' ``grad.mul_(mask)`` on stand-in gradients) and reports it as a fraction of the dense step.
``--full`` instead runs ``delta_t`` steps of each with ``delta_t`` as given and compares the means.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool), from the model zoo when present."""
    try:
        from sparse_compile.models import create_model

        return create_model("resnet18_cifar", num_classes=num_classes)
    except (ImportError, ValueError):
        import torchvision

        m = torchvision.models.resnet18(num_classes=num_classes)
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
        return m


def _step(model, opt, x, y, sparsifier=None, clock=time.perf_counter) -> tuple[float, float]:
    """One training step; returns (its time, the time of ``sparsifier.step()`` inside it)."""
    t = clock()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    ts = clock()
    if sparsifier is not None:
        sparsifier.step()
    te = clock()
    opt.zero_grad(set_to_none=True)
    return clock() - t, te - ts


def _grad_mask_cost(sp, clock, reps=7) -> float:
    """Time of what the gradient hooks do in one backward: ``grad.mul_(mask)`` for every sparse layer
    (measured on stand-in gradients, since inside backward it cannot be separated)."""
    grads = [torch.randn_like(layer.param) for layer in sp._layers]
    masks = [layer.mask for layer in sp._layers]
    ts = []
    for _ in range(reps):
        t = clock()
        for g, m in zip(grads, masks):
            g.mul_(m)
        ts.append(clock() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    """Run the benchmark; prints the timings and the overhead."""
    import sparse_compile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["srigl", "rigl", "static"], default="srigl")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--delta-t", type=int, default=100, help="update interval the overhead is averaged over")
    p.add_argument("--probe-every", type=int, default=4, help="update interval of the sampling run")
    p.add_argument("--steps", type=int, default=24, help="timed steps of each model (sampling mode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--full", action="store_true", help="time delta_t real steps of each model")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine; use --threads 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cls = {"srigl": sparse_compile.SRigL, "rigl": sparse_compile.RigL, "static": sparse_compile.StaticSparse}[a.method]

    def make(sparse: bool, delta_t: int):
        torch.manual_seed(a.seed)
        model = resnet18_cifar()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sp = None
        if sparse:
            sp = cls(model, opt, sparsity=a.sparsity, total_steps=10**6, delta_t=delta_t)
        return model, opt, sp

    every = a.delta_t if a.full else a.probe_every
    dense, dopt, _ = make(False, every)
    sparse, sopt, sp = make(True, every)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(a.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    print(f"CIFAR ResNet-18, batch {a.batch}, {torch.get_num_threads()} threads, {a.method} at sparsity "
          f"{a.sparsity}, {a.clock} clock, torch {torch.__version__}", flush=True)

    clock = time.perf_counter if a.clock == "wall" else time.process_time
    n_warm = a.warmup
    if not a.full:
        n_warm = a.warmup + (-a.warmup) % every  # start the timed run on an update cycle boundary
    for _ in range(n_warm):
        _step(dense, dopt, x, y, clock=clock)
        _step(sparse, sopt, x, y, sp, clock=clock)
    n = a.delta_t if a.full else a.steps
    td, ts, tsp, upd = [], [], [], []
    for i in range(n):
        before = sp.step_count + 1
        # Alternate which model goes first, so slow drifts of a shared machine hit both alike.
        if i % 2:
            s_t, s_sp = _step(sparse, sopt, x, y, sp, clock=clock)
            d_t, _ = _step(dense, dopt, x, y, clock=clock)
        else:
            d_t, _ = _step(dense, dopt, x, y, clock=clock)
            s_t, s_sp = _step(sparse, sopt, x, y, sp, clock=clock)
        td.append(d_t)
        ts.append(s_t)
        tsp.append(s_sp)
        upd.append(sp.is_update_step(before))
    md = statistics.median(td)
    if a.full:
        mean_d, mean_s = statistics.fmean(td), statistics.fmean(ts)
        print(f"dense  mean {1e3 * mean_d:8.1f} ms/step over {n} steps (median {1e3 * md:.1f})")
        print(f"sparse mean {1e3 * mean_s:8.1f} ms/step over {n} steps, {sum(upd)} update(s)")
        print(f"overhead averaged over delta_t={a.delta_t} steps: {100 * (mean_s / mean_d - 1):+.2f}%")
        return 0
    ordinary = [t for t, u in zip(ts, upd) if not u]
    updates = [t for t, u in zip(ts, upd) if u]
    sp_ord = statistics.median([t for t, u in zip(tsp, upd) if not u])
    sp_upd = statistics.median([t for t, u in zip(tsp, upd) if u]) if any(upd) else sp_ord
    hooks = _grad_mask_cost(sp, clock)
    mo = statistics.median(ordinary)
    mu = statistics.median(updates) if updates else mo
    e2e = ((a.delta_t - 1) * mo + mu) / a.delta_t
    work = hooks + ((a.delta_t - 1) * sp_ord + sp_upd) / a.delta_t
    print(f"dense step          median {1e3 * md:8.1f} ms  ({len(td)} samples)")
    print(f"sparse step         median {1e3 * mo:8.1f} ms  ({len(ordinary)} samples)  "
          f"{100 * (mo / md - 1):+.2f}% vs dense")
    print(f"sparse update step  median {1e3 * mu:8.1f} ms  ({len(updates)} samples)")
    print(f"trainer work: gradient-mask hooks {1e3 * hooks:.1f} ms/step, sparsifier.step() {1e3 * sp_ord:.1f} ms "
          f"(ordinary) / {1e3 * sp_upd:.0f} ms (update)")
    print(f"overhead averaged over delta_t={a.delta_t} steps, update included:")
    print(f"  end to end (step medians):        {100 * (e2e / md - 1):+.2f}%")
    print(f"  trainer work / dense step:        {100 * work / md:+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
