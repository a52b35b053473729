"""Grouped and depthwise convs at 90% sparsity: the condensed form (a groups=1 condensed conv whose
indices are offset to each output channel's group block) against dense grouped ``F.conv2d``
(oneDNN) on the same masked weight.

Shapes: the 3x3 grouped convs of ResNeXt-50 32x4d and RegNetY-1.6GF (one per stage) and the
depthwise convs of MobileNetV2 / EfficientNet-B0, batch 1 (and 8 with --batch 8), fp32, 1 and 2
threads. Weights: ``sparse_compile.benchmark.weights.random_layer`` per layer (constant fan-in,
10% of the output channels ablated), built into modules by ``optimize(mode="condensed")``. Calls are
interleaved (dense, condensed, dense, ...) and the medians compared, so load on a shared machine
hits both alike.

    .venv/bin/python bench/grouped_conv.py               # ~1 min on 2 cores
    .venv/bin/python bench/grouped_conv.py --quick       # one shape per family
    .venv/bin/python bench/grouped_conv.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
from torch import nn

import sparse_compile
from sparse_compile.benchmark.weights import random_layer
from sparse_compile.timing import interleaved_times

# (family, channels, groups, kernel, spatial): input = output channels, stride 1, "same" padding.
SHAPES = [
    ("resnext50_32x4d", 256, 32, 3, 28),
    ("resnext50_32x4d", 512, 32, 3, 14),
    ("resnext50_32x4d", 1024, 32, 3, 7),
    ("regnety_016", 120, 5, 3, 28),
    ("regnety_016", 336, 14, 3, 14),
    ("regnety_016", 888, 37, 3, 7),
    ("depthwise mobilenetv2", 144, 144, 3, 56),
    ("depthwise mobilenetv2", 576, 576, 3, 14),
    ("depthwise mobilenetv2", 960, 960, 3, 7),
    ("depthwise efficientnet_b0", 240, 240, 5, 28),
]
QUICK = [SHAPES[1], SHAPES[4], SHAPES[7]]


def sparse_grouped_conv(c: int, groups: int, k: int, sparsity: float, seed: int = 0) -> nn.Conv2d:
    """A grouped conv with SRigL-like weights: constant fan-in per output channel, 10% ablated."""
    conv = nn.Conv2d(c, c, k, padding=k // 2, groups=groups)
    lw = random_layer(c, (c // groups) * k * k, sparsity, ablated_fraction=0.1, seed=seed)
    with torch.no_grad():
        conv.weight.copy_(lw.weight.reshape(conv.weight.shape))
        conv.bias.copy_(lw.bias)
    return conv.eval()


def run(shapes, threads, batch: int, sparsity: float, budget_s: float) -> list:
    """One row per (shape, threads): median us of dense and condensed, and their ratio."""
    rows = []
    for family, c, g, k, s in shapes:
        conv = sparse_grouped_conv(c, g, k, sparsity)
        x = torch.randn(batch, c, s, s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = sparse_compile.optimize(nn.Sequential(conv), (x,), mode="condensed", min_numel=0, strict=True)
        cond = opt.get_submodule("0")
        assert type(cond).__name__ == "CondensedConv2d", opt.sparse_compile_report
        for t in threads:
            torch.set_num_threads(t)
            times = interleaved_times({"dense": lambda: conv(x), "condensed": lambda: cond(x)}, "cpu",
                                      repeats=200, budget_s=budget_s)
            med = {n: statistics.median(v) * 1e6 for n, v in times.items()}
            rows.append({"family": family, "channels": c, "groups": g, "kernel": k, "spatial": s, "batch": batch,
                         "threads": t, "k": cond.k, "dense_us": round(med["dense"], 1),
                         "condensed_us": round(med["condensed"], 1),
                         "dense_over_condensed": round(med["dense"] / med["condensed"], 2)})
            r = rows[-1]
            print(f"{family:26s} C={c:4d} g={g:4d} {k}x{k} {s:2d}x{s:<2d} k={cond.k:3d} thr={t}  dense "
                  f"{r['dense_us']:9.1f} us  condensed {r['condensed_us']:9.1f} us  dense/condensed "
                  f"{r['dense_over_condensed']:.2f}x", flush=True)
    return rows


def main(argv=None):
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape per family")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", type=float, default=0.6, help="seconds of timed calls per shape and thread count")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    rows = run(QUICK if a.quick else SHAPES, a.threads, a.batch, a.sparsity, a.budget)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
