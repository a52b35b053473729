"""Test accuracy of dense, StaticSparse, RigL and SRigL on scikit-learn's digits (CPU, a few minutes).

    .venv/bin/python bench/digits_accuracy.py                 # the README table
    .venv/bin/python bench/digits_accuracy.py --sparsity 0.99 --seeds 0 1 2 3 4

The MLP 64-300-100-10 (ReLU) trains on a fixed stratified 80/20 split of the 1797 8x8 digits (the
split is seeded by 0; ``--seed`` values change the initialisation, the masks and the batch order).
Every method gets the same epochs, batch size, optimizer (SGD, momentum 0.9, weight decay 5e-4,
cosine learning-rate decay) and, for the sparse ones, the same ERK layer budgets; RigL and SRigL
share ``delta_t``, ``alpha`` and ``t_end``. Prints a markdown table: mean and sample standard
deviation of the final test accuracy over the seeds.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("dense", "static", "rigl", "srigl")
NAMES = {"dense": "Dense", "static": "StaticSparse", "rigl": "RigL", "srigl": "SRigL"}


def load():
    """(x_train, y_train, x_test, y_test) tensors of the digits, pixels scaled to [0, 1]."""
    try:
        from sparse_compile.train.data import load_digits

        tr, te = load_digits(seed=0)
        return tr.tensors[0], tr.tensors[1], te.tensors[0], te.tensors[1]
    except ImportError:  # the data module is another helper's; scikit-learn directly otherwise
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split

        x, y = _load(return_X_y=True)
        a, b, c, d = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
        f = lambda v: torch.tensor(v / 16.0, dtype=torch.float32)  # noqa: E731
        return f(a), torch.tensor(c), f(b), torch.tensor(d)


def mlp() -> nn.Module:
    """64-300-100-10 ReLU MLP."""
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def run(method: str, seed: int, data, a) -> tuple[float, float]:
    """Train one model; returns (test accuracy, global sparsity of the trained weights)."""
    import sparse_compile

    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / a.batch)
    total = a.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    sp = None
    if method != "dense":
        cls = {"static": sparse_compile.StaticSparse, "rigl": sparse_compile.RigL, "srigl": sparse_compile.SRigL}[method]
        kw = dict(sparsity=a.sparsity, total_steps=total, delta_t=a.delta_t, alpha=a.alpha, t_end=a.t_end)
        if method == "srigl":
            kw["gamma_sal"] = a.gamma_sal
        sp = cls(model, opt, **kw)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(a.epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), a.batch):
            idx = perm[i:i + a.batch]
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            if sp is not None:
                sp.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    sparsity = 1 - sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)
    if sp is not None:
        sparsity = sp.sparsity  # exact, from the masks (a live weight may be exactly 0)
    return acc, sparsity


def main(argv=None) -> int:
    """Run every method over the seeds and print the markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--delta-t", type=int, default=45, help="steps between topology updates (45 = one epoch)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--t-end", type=float, default=0.75)
    p.add_argument("--gamma-sal", type=float, default=0.3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load()
    print(f"digits: {len(data[0])} train / {len(data[2])} test, MLP 64-300-100-10, sparsity {a.sparsity}, "
          f"{a.epochs} epochs, batch {a.batch}, SGD lr {a.lr} (cosine), delta_t {a.delta_t}, alpha {a.alpha}, "
          f"t_end {a.t_end}, gamma_sal {a.gamma_sal}, seeds {a.seeds}", flush=True)
    rows = []
    for method in a.methods:
        t = time.perf_counter()
        res = [run(method, s, data, a) for s in a.seeds]
        accs = [100 * r[0] for r in res]
        mean = statistics.fmean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append((NAMES[method], mean, std, res[0][1], accs))
        print(f"  {NAMES[method]}: {mean:.2f} +- {std:.2f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    print()
    print("| method | test accuracy (%) | sparsity | per seed |")
    print("|---|---|---|---|")
    for name, mean, std, sp, accs in rows:
        print(f"| {name} | {mean:.2f} ± {std:.2f} | {100 * sp:.2f}% | {', '.join(f'{v:.2f}' for v in accs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
