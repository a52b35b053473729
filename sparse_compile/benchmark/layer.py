"""Benchmarks: timing, machine info, result files, and the one-layer benchmark of every form.

The scripts under ``bench/`` (repository only) and ``sparse-compile bench layer`` (installed) are
thin wrappers around this module, so the numbers a user gets from the package and from the
repository come from the same code.

Timing (``time_fn``): warm-up calls, then repeated blocks; the figure is the median over blocks, the
spread their quartiles. CPU uses ``torch.utils.benchmark.Timer`` (which also pins the thread count);
CUDA uses ``triton.testing.do_bench`` (L2 flushed between calls), else CUDA events. Ratios in the
tables are only ever taken between figures of the same run.

One-layer benchmark (:func:`run_layer_bench`): a sparse Linear weight ``[out, in]`` (random
constant fan-in, or a trained layer from a checkpoint) in each *form*:

=====================  ==========================================================================
``dense``              ``F.linear`` with the masked dense weight (the reference).
``ablated_dense``      ``F.linear`` with the active rows only, scattered into the full-width output
                       (ablated neurons output their bias): exactly the dense layer's output.
``structured``         the paper's "structured" row: a *dense* weight (no fine-grained sparsity)
                       over the same active neurons, computing only those outputs. It is a
                       different layer (checked against its own reference); it shows what neuron
                       ablation alone buys. ``ablated_dense`` minus ``structured`` is the scatter.
``condensed``          ``sparse_compile.kernels.condensed_linear`` on the active rows, scattered.
``csr``                ``torch.sparse_csr`` weight times ``x^T`` (all rows; ablated rows empty).
``semi_structured``    torch's 2:4 semi-structured sparse weight (CUDA only). Always 50% sparse: a
                       different weight (2 of every 4 kept by magnitude), checked against its own
                       reference; a vendor-supported baseline, not the same layer.
``deepsparse``         Neural Magic's DeepSparse engine on the same weights (CPU, optional: only
                       when ``deepsparse`` imports).
=====================  ==========================================================================

Every form runs eagerly and, unless ``compile="none"``, under ``torch.compile`` (``fullgraph``
except for CSR, which dynamo cannot capture whole, as in the paper). Before any timing, every
form's output is compared with its float64 reference; a form that disagrees is reported as
``wrong`` and not timed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Timing",
    "time_fn",
    "time_cpu",
    "time_gpu",
    "num_threads",
    "cpu_model",
    "machine_info",
    "write_results",
    "read_results",
    "result_paths",
    "FORMS",
    "FORM_LABELS",
    "LayerWeights",
    "Form",
    "Skip",
    "parse_shape",
    "random_layer",
    "checkpoint_layer",
    "build_form",
    "LayerBenchConfig",
    "run_layer_bench",
    "add_speedups",
    "markdown_table",
    "tables",
    "add_layer_arguments",
    "config_from_args",
    "layer_main",
    "relative_error",
    "tolerance",
]

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """One timed configuration: median and quartiles of per-call times, in microseconds."""

    median_us: float
    q25_us: float
    q75_us: float
    n: int  # number of measurements (blocks of calls) the quantiles are taken over
    method: str

    @property
    def iqr_us(self) -> float:
        """Interquartile range (the spread shown as error bars)."""
        return self.q75_us - self.q25_us

    def to_dict(self) -> dict:
        """Flat dict for the result rows."""
        return {
            "median_us": self.median_us,
            "q25_us": self.q25_us,
            "q75_us": self.q75_us,
            "iqr_us": self.iqr_us,
            "n_measurements": self.n,
            "timer": self.method,
        }


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@contextlib.contextmanager
def num_threads(n: Optional[int]):
    """Run the body with ``torch.set_num_threads(n)`` (no change when ``n`` is None), then restore."""
    old = torch.get_num_threads()
    if n is not None:
        if int(n) < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_cpu(
    fn: Callable,
    *args,
    threads: Optional[int] = None,
    min_run_time: float = 0.2,
    min_blocks: int = 5,
    block_time: float = 0.01,
    warmup: int = 3,
) -> Timing:
    """Time ``fn(*args)`` on CPU with ``torch.utils.benchmark.Timer``.

    The number of calls per block is chosen so a block lasts about ``block_time`` seconds (short
    calls would otherwise be dominated by timer overhead); blocks are repeated until at least
    ``min_blocks`` blocks and ``min_run_time`` seconds. ``min_blocks=1, min_run_time=0`` is a
    one-shot measurement for smoke tests.
    """
    from torch.utils.benchmark import Timer

    threads = torch.get_num_threads() if threads is None else int(threads)
    with num_threads(threads):
        for _ in range(max(0, warmup)):
            fn(*args)
    timer = Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}, num_threads=threads)
    number = 1
    while True:
        t = timer.timeit(number).median * number
        if t >= block_time or number >= 10**6:
            break
        number = min(10**6, max(number * 2, int(number * block_time / max(t, 1e-9) * 1.1)))
    times = []
    start = time.perf_counter()
    while len(times) < max(1, min_blocks) or time.perf_counter() - start < min_run_time:
        times.append(timer.timeit(number).median)
    times.sort()
    us = [t * 1e6 for t in times]
    return Timing(_quantile(us, 0.5), _quantile(us, 0.25), _quantile(us, 0.75), len(us),
                  f"torch.utils.benchmark.Timer x{number}")


def time_gpu(fn: Callable, *args, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Time ``fn(*args)`` on CUDA: ``triton.testing.do_bench`` quartiles, else CUDA events."""
    call = (lambda: fn(*args)) if args else fn
    try:
        from triton.testing import do_bench

        q25, med, q75 = do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        n = max(1, int(rep_ms / max(med, 1e-6)))
        return Timing(med * 1e3, q25 * 1e3, q75 * 1e3, n, "triton.testing.do_bench")
    except ImportError:
        pass
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    times = []
    budget = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or time.perf_counter() < budget:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.25), _quantile(times, 0.75), len(times), "cuda events")


def time_fn(fn: Callable, *args, device="cpu", threads: Optional[int] = None, quick: bool = False,
            min_run_time: float = 0.2) -> Timing:
    """Time ``fn(*args)`` on ``device`` (CPU: with ``threads``); ``quick`` = one short measurement."""
    if torch.device(device).type == "cuda":
        return time_gpu(fn, *args, warmup_ms=1 if quick else 25, rep_ms=5 if quick else 100)
    if quick:
        return time_cpu(fn, *args, threads=threads, min_run_time=0.0, min_blocks=1, block_time=0.0, warmup=1)
    return time_cpu(fn, *args, threads=threads, min_run_time=min_run_time)


# ---------------------------------------------------------------------------------------------
# Machine information and result files
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """Commit of the source tree this module runs from, when it is a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _condensed_impl(device: str) -> str:
    """Which implementation runs ``condensed_linear`` on ``device`` (kernel, or the fallback)."""
    if not hasattr(torch.ops, "sparse_compile") or not hasattr(torch.ops.sparse_compile, "condensed_linear"):
        return "plain-torch reference (torch.ops.sparse_compile.condensed_linear not registered)"
    if torch.device(device).type == "cuda":
        return "triton"
    try:
        from sparse_compile.kernels import cpu as _cpu

        if _cpu.load():
            return "C++ CPU kernel"
        return f"plain-torch reference fallback ({_cpu.build_info().get('error')})"
    except ImportError:
        return "torch.ops.sparse_compile.condensed_linear"


def machine_info(device="cpu") -> dict:
    """Everything needed to tell two runs apart: hardware, versions, date, threads."""
    import sparse_compile

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "sparse_compile": sparse_compile.__version__,
        "git_commit": _git_commit(),
    }
    for mod in ("triton", "torchvision", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        info["gpu_name"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        info["allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        info["gpu_name"] = None
    info["condensed_impl"] = _condensed_impl(device)
    return info


def result_paths(out_dir, name: str) -> tuple:
    """``(json_path, csv_path)`` for a run named ``name`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / f"{name}.json", out_dir / f"{name}.csv"


def write_results(out_dir, name: str, meta: dict, rows: list) -> tuple:
    """Write ``{"meta": meta, "rows": rows}`` as JSON and the rows as CSV; return both paths.

    The CSV columns are the union of the rows' keys in first-seen order, with the machine's
    ``date``, ``cpu_model`` and ``gpu_name`` on every line so a CSV read alone still says where
    its figures come from.
    """
    jpath, cpath = result_paths(out_dir, name)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        f.write("\n")
    cols: list = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    stamp = {k: meta.get("machine", meta).get(k) for k in ("date", "cpu_model", "gpu_name")}
    cols += [k for k in stamp if k not in cols]
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**stamp, **{k: ("" if v is None else v) for k, v in r.items()}})
    return jpath, cpath


def read_results(path) -> dict:
    """Load a results JSON written by :func:`write_results` (checks its structure)."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict) or "meta" not in d or not isinstance(d.get("rows"), list):
        raise ValueError(f"{path}: not a sparse_compile benchmark result (expected keys 'meta' and 'rows')")
    return d


# ---------------------------------------------------------------------------------------------
# Layer weights
# ---------------------------------------------------------------------------------------------

FORMS = ("dense", "ablated_dense", "structured", "condensed", "csr", "semi_structured", "deepsparse")
FORM_LABELS = {
    "dense": "dense",
    "ablated_dense": "ablated-dense",
    "structured": "structured only",
    "condensed": "condensed",
    "csr": "CSR",
    "semi_structured": "2:4 semi-structured",
    "deepsparse": "DeepSparse",
}
DEFAULT_LAYERS = ("768x3072", "3072x768")
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
CPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GPU_BATCHES = (1, 256, 2048)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_shape(s: str) -> tuple:
    """``"768x3072"`` -> ``(768, 3072)``: out features x in features (the weight's shape)."""
    try:
        out, inp = (int(p) for p in str(s).lower().split("x"))
    except ValueError:
        raise ValueError(f"layer shape {s!r}: expected OUTxIN, e.g. 768x3072 (ViT-B/16 fc2)") from None
    if out <= 0 or inp <= 0:
        raise ValueError(f"layer shape {s!r}: sizes must be positive")
    return out, inp


@dataclass
class LayerWeights:
    """A sparse Linear layer to benchmark: masked weight ``[out, in]``, mask, bias, provenance."""

    name: str
    weight: Tensor  # zero outside the mask
    mask: Tensor  # bool, weight's shape
    bias: Optional[Tensor]
    source: str  # "random constant fan-in" or "checkpoint <path>"
    target_sparsity: float

    def analysis(self):
        """:func:`sparse_compile.formats.analyze` of the weight under its mask."""
        from sparse_compile.formats import analyze

        return analyze(self.weight, self.mask, self.name)

    def describe(self) -> dict:
        """The layer's structure as stored in every result row."""
        a = self.analysis()
        return {
            "layer": self.name,
            "out_features": a.out_features,
            "in_features": a.fan_in_dense,
            "sparsity": round(self.target_sparsity, 6),
            "actual_sparsity": round(a.sparsity, 6),
            "n_active": a.n_active,
            "n_ablated": a.n_ablated,
            "k": a.k if a.k is not None else -1,
            "weights": self.source,
        }


def random_layer(out: int, inp: int, sparsity: float, ablated_fraction: float = 0.1, bias: bool = True,
                 seed: int = 0, name: Optional[str] = None) -> LayerWeights:
    """A constant fan-in layer with SRigL's statistics, as if trained with neuron ablation.

    ``round(ablated_fraction * out)`` neurons (chosen at random) are ablated and, as SRigL does, the
    layer's weight budget ``out * k`` (``k`` from ``sparsity`` over all neurons) is spread over the
    active ones, whose fan-in grows to ``floor(budget / n_active)`` (at most ``inp``). Live weights
    are ``N(0, 2/k)`` (sparse Kaiming init), bias ``N(0, 0.1^2)``.
    """
    from sparse_compile.train.budgets import constant_fan_in, sparse_init_

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= ablated_fraction < 1.0:
        raise ValueError(f"ablated_fraction must be in [0, 1), got {ablated_fraction}")
    g = torch.Generator().manual_seed(seed)
    n_abl = min(out - 1, int(round(ablated_fraction * out)))
    n_act = out - n_abl
    budget = out * constant_fan_in(1.0 - sparsity, inp)
    k = max(1, min(inp, budget // n_act))
    active = torch.randperm(out, generator=g)[:n_act].sort().values
    scores = torch.rand(n_act, inp, generator=g)
    cols = torch.topk(scores, k, dim=1).indices
    mask = torch.zeros(out, inp, dtype=torch.bool)
    mask[active.unsqueeze(1), cols] = True
    w = torch.empty(out, inp)
    sparse_init_(w, mask, generator=g)
    b = torch.randn(out, generator=g) * 0.1 if bias else None
    return LayerWeights(name or f"{out}x{inp}", w, mask, b, "random constant fan-in", float(sparsity))


def checkpoint_layer(path, layer: Optional[str] = None) -> LayerWeights:
    """A trained layer from a checkpoint: ``<layer>.weight``, ``<layer>.weight_mask`` (if saved), bias.

    ``layer`` may be omitted when the checkpoint holds a single 2-D weight with a mask; otherwise a
    ``KeyError`` lists the candidates.
    """
    from sparse_compile.checkpoint import load_state_dict
    from sparse_compile.formats import analyze

    sd = load_state_dict(path)
    linear = sorted(k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2)
    masked = [n for n in linear if f"{n}.weight_mask" in sd]
    if layer is None:
        if len(masked) != 1:
            raise KeyError(f"{path}: pick a layer with --layer; 2-D sparse weights: {masked or linear}")
        layer = masked[0]
    if f"{layer}.weight" not in sd:
        raise KeyError(f"{path}: no weight {layer + '.weight'!r}; 2-D weights: {linear}")
    w = sd[f"{layer}.weight"].float()
    if w.dim() != 2:
        raise ValueError(f"{path}: layer {layer!r} has a {w.dim()}-D weight; the layer benchmark takes Linear layers")
    m = sd.get(f"{layer}.weight_mask")
    mask = (m.bool() if m is not None else (w != 0))
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"{path}: layer {layer!r}: mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    w = w * mask
    b = sd.get(f"{layer}.bias")
    a = analyze(w, mask, layer)
    return LayerWeights(layer, w, mask, None if b is None else b.float(), f"checkpoint {path}", a.sparsity)


# ---------------------------------------------------------------------------------------------
# Forms
# ---------------------------------------------------------------------------------------------


class Skip(Exception):
    """A form that cannot run here; the message says why (it goes into the result row)."""


@dataclass
class Form:
    """A callable computing the layer in one form, and the float64 reference it must match."""

    name: str
    fn: Callable[[Tensor], Tensor]
    reference: Callable[[Tensor], Tensor]  # float64 in, float64 out
    fullgraph: bool = True
    note: str = ""


def _scatter_into(y_active: Tensor, base: Tensor, rows: Tensor) -> Tensor:
    """The full-width output: ``base`` (bias or 0 per neuron) with the active columns replaced."""
    y = base.expand(*y_active.shape[:-1], base.shape[0]).clone()
    return y.index_copy_(-1, rows, y_active)


def _linear64(w: Tensor, b: Optional[Tensor], rows: Optional[Tensor] = None):
    w64 = w.detach().to("cpu", torch.float64)
    b64 = None if b is None else b.detach().to("cpu", torch.float64)
    if rows is not None:
        w64 = w64[rows.cpu()]
        b64 = None if b64 is None else b64[rows.cpu()]
    return lambda x: F.linear(x.to("cpu", torch.float64), w64, b64)


def _two_four(w: Tensor) -> Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive inputs (the 2:4 pattern)."""
    out, inp = w.shape
    if inp % 4:
        raise Skip(f"2:4 needs in_features divisible by 4, got {inp}")
    g = w.reshape(out, inp // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
    return (g * keep).reshape(out, inp)


def _deepsparse_engine_fn(w: Tensor, b: Optional[Tensor], threads: Optional[int]):
    """A DeepSparse engine for ``y = x w^T + b`` (ONNX Gemm built directly), one per batch size."""
    try:
        import deepsparse
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise Skip(f"deepsparse is not installed ({e}); it reached end of life in 2025, see the README") from None
    out, inp = w.shape
    bias = (b if b is not None else torch.zeros(out)).detach().float().numpy()
    tmp = Path(tempfile.mkdtemp(prefix="sc-deepsparse-"))
    engines: dict = {}

    def engine(batch: int):
        if batch not in engines:
            graph = helper.make_graph(
                [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "sparse_layer",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inp])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out])],
                initializer=[numpy_helper.from_array(w.detach().float().numpy(), "W"),
                             numpy_helper.from_array(bias, "b")],
            )
            path = tmp / f"layer_b{batch}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
            engines[batch] = deepsparse.compile_model(str(path), batch_size=batch, num_cores=threads)
        return engines[batch]

    def fn(x: Tensor) -> Tensor:
        return torch.from_numpy(engine(x.shape[0]).run([np.ascontiguousarray(x.numpy())])[0])

    return fn, f"deepsparse {deepsparse.__version__}"


def build_form(form: str, lw: LayerWeights, device="cpu", dtype=torch.float32,
               threads: Optional[int] = None, seed: int = 0) -> Form:
    """Build ``form`` (one of :data:`FORMS`) of the layer on ``device`` in ``dtype``.

    Raises :class:`Skip` with the reason when the form cannot run here.
    """
    from sparse_compile import formats

    dev = torch.device(device)
    a = lw.analysis()
    rows = a.active_rows.to(dev)
    full = a.n_ablated == 0
    w = lw.weight.to(dev, dtype)
    b = None if lw.bias is None else lw.bias.to(dev, dtype)
    base = b if b is not None else torch.zeros(a.out_features, device=dev, dtype=dtype)
    ref = _linear64(lw.weight, lw.bias)

    if form == "dense":
        return Form(form, lambda x: F.linear(x, w, b), ref)

    if form == "ablated_dense":
        ad = formats.to_ablated_dense(lw.weight, lw.mask, lw.bias, lw.name)
        wa = ad.weight.to(dev, dtype)
        ba = None if b is None else b[rows]
        if full:
            return Form(form, lambda x: F.linear(x, wa, ba), ref, note="no ablated neuron: same as dense")
        return Form(form, lambda x: _scatter_into(F.linear(x, wa, ba), base, rows), ref)

    if form == "structured":
        g = torch.Generator().manual_seed(seed + 1)
        ws = torch.randn(a.n_active, a.fan_in_dense, generator=g) * math.sqrt(2.0 / a.fan_in_dense)
        wfull = torch.zeros(a.out_features, a.fan_in_dense)
        wfull[a.active_rows] = ws
        wsd = ws.to(dev, dtype)
        bs = None if b is None else b[rows]
        return Form(form, lambda x: F.linear(x, wsd, bs), _linear64(wfull, lw.bias, a.active_rows),
                    note=f"dense weight over the {a.n_active} active neurons, active outputs only (paper's 'structured')")

    if form == "condensed":
        c = formats.to_condensed(lw.weight, lw.mask, lw.bias, lw.name, pad=not a.constant_fan_in)
        vals = c.values.to(dev, dtype).contiguous()
        idx = c.indices.to(dev).contiguous()
        bc = None if b is None else b[rows].contiguous()
        try:
            from sparse_compile.kernels import condensed_linear as op
        except ImportError:
            from sparse_compile.kernels.reference import condensed_linear_ref as op
        note = _condensed_impl(device) + ("; rows padded to the max fan-in" if c.padded else "")
        if full:
            return Form(form, lambda x: op(x, vals, idx, bc), ref, note=note)
        return Form(form, lambda x: _scatter_into(op(x, vals, idx, bc), base, rows), ref, note=note)

    if form == "csr":
        try:
            csr = formats.to_csr(lw.weight, lw.mask, active_only=False, name=lw.name).csr.to(dev).to(dtype)
        except (RuntimeError, NotImplementedError) as e:
            raise Skip(f"torch CSR tensors unavailable for {dtype} on {dev.type}: {str(e).splitlines()[0][:160]}") from None
        # not every device / dtype / torch version has every CSR kernel: take the first that runs
        candidates = []
        if b is not None:
            bcol = b.unsqueeze(1)
            candidates.append(("torch.addmm(bias, csr, x^T)^T", lambda x: torch.addmm(bcol, csr, x.t()).t()))
            candidates.append(("torch.mm(csr, x^T)^T + bias", lambda x: torch.mm(csr, x.t()).t() + b))
        else:
            candidates.append(("torch.mm(csr, x^T)^T", lambda x: torch.mm(csr, x.t()).t()))
        probe = torch.zeros(2, a.fan_in_dense, device=dev, dtype=dtype)
        why = []
        for note, fn in candidates:
            try:
                fn(probe)
                return Form(form, fn, ref, fullgraph=False, note=note)
            except (RuntimeError, NotImplementedError) as e:
                why.append(f"{note}: {str(e).splitlines()[0][:120]}")
        raise Skip(f"torch CSR matmul unavailable for {dtype} on {dev.type}: " + "; ".join(why))

    if form == "semi_structured":
        if dev.type != "cuda":
            raise Skip("torch 2:4 semi-structured sparsity needs a CUDA GPU (cuSPARSELt/CUTLASS kernels)")
        to_ss = getattr(torch.sparse, "to_sparse_semi_structured", None)
        if to_ss is None:
            raise Skip(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
        g = torch.Generator().manual_seed(seed + 2)
        w24 = _two_four(torch.randn(a.out_features, a.fan_in_dense, generator=g) * math.sqrt(2.0 / a.fan_in_dense))
        try:
            wss = to_ss(w24.to(dev, dtype))
            F.linear(torch.zeros(8, a.fan_in_dense, device=dev, dtype=dtype), wss, b)
        except Exception as e:  # unsupported dtype / shape / GPU arch: many exception types
            raise Skip(f"2:4 semi-structured unavailable for {dtype} here: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        return Form(form, lambda x: F.linear(x, wss, b), _linear64(w24, lw.bias), fullgraph=False,
                    note="always 50% sparse (2:4 pattern by magnitude), a different weight: vendor baseline")

    if form == "deepsparse":
        if dev.type != "cpu" or dtype != torch.float32:
            raise Skip("DeepSparse baseline runs on CPU in fp32 only")
        fn, note = _deepsparse_engine_fn(lw.weight, lw.bias, threads)
        return Form(form, fn, ref, fullgraph=False, note=note)

    raise ValueError(f"unknown form {form!r}; choose from {', '.join(FORMS)}")


def tolerance(dtype) -> float:
    """Max relative error (to the reference's largest magnitude) accepted for ``dtype``."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def relative_error(y: Tensor, ref: Tensor) -> float:
    """``max|y - ref| / max|ref|`` in float64 (inf when shapes differ or ``y`` has NaNs)."""
    if tuple(y.shape) != tuple(ref.shape):
        return float("inf")
    y = y.detach().to("cpu", torch.float64)
    err = (y - ref).abs().max().item() if y.numel() else 0.0
    if math.isnan(err):
        return float("inf")
    return err / max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)


# ---------------------------------------------------------------------------------------------
# The layer benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerBenchConfig:
    """What :func:`run_layer_bench` measures. ``None`` fields take the device's defaults."""

    layers: Sequence[str] = DEFAULT_LAYERS
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    batches: Optional[Sequence[int]] = None  # CPU 1..64, GPU 1/256/2048
    threads: Optional[Sequence[int]] = None  # CPU: 1 and all cores; GPU: ignored
    dtypes: Optional[Sequence[str]] = None  # CPU fp32; GPU fp32, bf16
    forms: Sequence[str] = ("dense", "ablated_dense", "structured", "condensed", "csr", "semi_structured", "deepsparse")
    device: str = "cpu"
    compile: Optional[str] = None  # "none", "default", "max-autotune"; None: max-autotune
    ablated_fraction: float = 0.1
    checkpoint: Optional[str] = None
    checkpoint_layer: Optional[str] = None
    quick: bool = False  # one short measurement per configuration (smoke tests)
    min_run_time: float = 0.2
    seed: int = 0

    def resolved(self) -> "LayerBenchConfig":
        """A copy with the device-dependent defaults filled in and every field checked."""
        dev = torch.device(self.device)
        cuda = dev.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available on this machine")
        c = LayerBenchConfig(**asdict(self))
        c.batches = tuple(int(b) for b in (self.batches or (GPU_BATCHES if cuda else CPU_BATCHES)))
        if cuda:
            c.threads = (None,)
        else:
            cores = os.cpu_count() or 1
            c.threads = tuple(dict.fromkeys(int(t) for t in (self.threads or (1, cores))))
        c.dtypes = tuple(self.dtypes or (("fp32", "bf16") if cuda else ("fp32",)))
        c.compile = self.compile or "max-autotune"
        bad = [f for f in c.forms if f not in FORMS]
        if bad:
            raise ValueError(f"unknown form(s) {bad}; choose from {', '.join(FORMS)}")
        bad = [d for d in c.dtypes if d not in _DTYPES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; choose from {', '.join(_DTYPES)}")
        if c.compile not in ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"):
            raise ValueError(f"compile must be none, default or max-autotune, got {c.compile!r}")
        if any(b < 1 for b in c.batches):
            raise ValueError(f"batch sizes must be >= 1, got {list(c.batches)}")
        if any(t is not None and t < 1 for t in c.threads):
            raise ValueError(f"thread counts must be >= 1, got {list(c.threads)}")
        if any(not 0.0 <= s < 1.0 for s in c.sparsities):
            raise ValueError(f"sparsities must be in [0, 1), got {list(c.sparsities)}")
        for s in c.layers:
            parse_shape(s)
        return c

    def weights(self) -> list:
        """The layers to run: the checkpoint's layer, or one random layer per (shape, sparsity)."""
        if self.checkpoint:
            return [checkpoint_layer(self.checkpoint, self.checkpoint_layer)]
        return [random_layer(*parse_shape(s), sp, self.ablated_fraction, seed=self.seed + i, name=s)
                for s in self.layers for i, sp in enumerate(self.sparsities)]


def _compile(fn: Callable, mode: str, fullgraph: bool) -> Callable:
    """``torch.compile`` from a clean dynamo state, static shapes (one graph per batch size)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # graph / graph-break counts below must be this compile's only
    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=fullgraph, dynamic=False)


def _dynamo_stats() -> tuple:
    """(graphs captured, graph breaks) since the last reset: tells a compiled run from an eager fallback."""
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"].get("unique_graphs", 0))
    breaks = int(sum(counters["graph_break"].values()))
    return graphs, breaks


def run_layer_bench(config: LayerBenchConfig, progress: bool = True, log=None) -> dict:
    """Run the layer benchmark; return ``{"meta": ..., "rows": [...]}`` (rows also carry speedups).

    Each row is one (layer, sparsity, batch, threads, dtype, form, compiled) configuration with
    ``status`` ``ok`` (timed; ``rel_err`` is its error against the float64 reference), ``skipped``
    (``note`` says why), ``wrong`` (output did not match: not timed) or ``error``.
    """
    from tqdm import tqdm

    cfg = config.resolved()
    dev = torch.device(cfg.device)
    layers = cfg.weights()
    variants = [False] + ([True] if cfg.compile != "none" else [])
    total = len(cfg.threads) * len(layers) * len(cfg.dtypes) * len(cfg.forms) * len(variants) * len(cfg.batches)
    bar = tqdm(total=total, desc="bench layer", disable=not progress, unit="cfg", file=sys.stderr)
    say = log or (lambda s: tqdm.write(s, file=sys.stderr) if progress else None)
    rows: list = []
    t_start = time.perf_counter()
    x_cache: dict = {}

    def x_for(batch, inp, dtype):
        key = (batch, inp, dtype)
        if key not in x_cache:
            g = torch.Generator().manual_seed(cfg.seed + 7 + batch)
            x_cache[key] = torch.randn(batch, inp, generator=g).to(dev, _DTYPES[dtype])
        return x_cache[key]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for threads in cfg.threads:
            with num_threads(threads):
                for lw in layers:
                    desc = lw.describe()
                    for dname in cfg.dtypes:
                        dtype = _DTYPES[dname]
                        for fname in cfg.forms:
                            base = {**desc, "device": dev.type, "dtype": dname,
                                    "threads": threads if threads is not None else "",
                                    "form": fname}
                            try:
                                form = build_form(fname, lw, dev, dtype, threads, cfg.seed)
                                build_err = None
                            except Skip as e:
                                form, build_err = None, ("skipped", str(e))
                            except Exception as e:  # a broken form must not stop the whole run
                                form, build_err = None, ("error", f"{type(e).__name__}: {e}")
                            for compiled in variants:
                                for batch in cfg.batches:
                                    bar.update(1)
                                    row = {**base, "compiled": compiled, "batch": batch,
                                           "compile_mode": cfg.compile if compiled else "eager"}
                                    if form is None:
                                        rows.append({**row, "status": build_err[0], "note": build_err[1]})
                                        continue
                                    rows.append({**row, **_measure(form, x_for(batch, desc["in_features"], dname),
                                                                   compiled, cfg, threads, dev, dtype, say)})
    bar.close()
    add_speedups(rows)
    meta = {
        "benchmark": "layer",
        "machine": machine_info(cfg.device),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "wall_s": round(time.perf_counter() - t_start, 2),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "notes": {
            "time": "median_us over blocks of calls; q25_us/q75_us are its quartiles (error bars)",
            "speedup_vs_dense": "dense median / this median, same run, same layer/batch/threads/dtype/compiled",
            "structured": "paper's 'structured' row: dense weights on the active neurons only, active outputs only",
        },
    }
    return {"meta": meta, "rows": rows}


def _measure(form: Form, x: Tensor, compiled: bool, cfg: LayerBenchConfig, threads, dev, dtype, say) -> dict:
    """Check one form against its reference at this input, then time it; the row's result fields."""
    out: dict = {"note": form.note}
    fn = form.fn
    try:
        if compiled:
            fn = _compile(form.fn, cfg.compile, form.fullgraph)
            t0 = time.perf_counter()
            y = fn(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out["compile_s"] = round(time.perf_counter() - t0, 3)
            graphs, breaks = _dynamo_stats()
            out["graphs"], out["graph_breaks"] = graphs, breaks
            if graphs == 0:
                # e.g. CSR: dynamo cannot trace sparse tensors, so the "compiled" call is the eager one
                return {**out, "status": "skipped",
                        "note": f"torch.compile captured no graph ({breaks} graph break(s)): it would run eagerly, "
                                "as the eager row"}
        else:
            y = fn(x)
    except Exception as e:
        say(f"  {form.name} ({'compiled' if compiled else 'eager'}, batch {x.shape[0]}): {type(e).__name__}: {e}")
        return {**out, "status": "error", "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    err = relative_error(y, form.reference(x))
    out["rel_err"] = err
    if not err <= tolerance(dtype):
        say(f"  {form.name} ({'compiled' if compiled else 'eager'}, batch {x.shape[0]}): WRONG output, rel err {err:.3g}")
        return {**out, "status": "wrong"}
    t = time_fn(fn, x, device=dev, threads=threads, quick=cfg.quick, min_run_time=cfg.min_run_time)
    return {**out, "status": "ok", **t.to_dict()}


_KEY = ("layer", "sparsity", "batch", "threads", "dtype", "device", "compiled")


def add_speedups(rows: list) -> list:
    """Set ``speedup_vs_dense`` on every timed row (dense median / row median, same key)."""
    dense = {tuple(r[k] for k in _KEY): r["median_us"] for r in rows
             if r["form"] == "dense" and r.get("status") == "ok"}
    for r in rows:
        d = dense.get(tuple(r.get(k) for k in _KEY))
        r["speedup_vs_dense"] = round(d / r["median_us"], 3) if d and r.get("status") == "ok" else None
    return rows


def _fmt_us(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:.2f} ms"
    return f"{v:.1f} µs" if v < 100 else f"{v:.0f} µs"


def markdown_table(result: dict, layer: Optional[str] = None, sparsity: Optional[float] = None,
                   dtype: Optional[str] = None, compiled: Optional[bool] = None,
                   batches: Optional[Sequence[int]] = None, threads: Optional[Sequence] = None) -> str:
    """A markdown table: one line per (layer, sparsity, batch, threads, dtype), one column per form.

    The keyword arguments keep only the matching rows (``None``: all).

    Cells are the median time; the last columns are condensed's speedup over dense and over CSR
    (same run, same variant) and the fastest form that computes the same layer (``structured`` and
    ``semi_structured`` are different layers and never "fastest").
    """
    eager_csr = {(r["layer"], r["sparsity"], r["batch"], r["threads"], r["dtype"]): r for r in result["rows"]
                 if r.get("status") == "ok" and r["form"] == "csr" and not r["compiled"]}
    rows = [r for r in result["rows"] if r.get("status") == "ok"
            and (layer is None or r["layer"] == layer)
            and (sparsity is None or abs(r["sparsity"] - sparsity) < 1e-9)
            and (dtype is None or r["dtype"] == dtype)
            and (compiled is None or r["compiled"] == compiled)
            and (batches is None or r["batch"] in batches)
            and (threads is None or r["threads"] in threads)]
    if not rows:
        return "(no timed rows)\n"
    cols = []
    for r in rows:
        c = (r["form"], r["compiled"])
        if c not in cols:
            cols.append(c)
    cols.sort(key=lambda c: (c[1], FORMS.index(c[0])))
    both = len({c[1] for c in cols}) > 1

    def label(c):
        return FORM_LABELS[c[0]] + (" (compiled)" if c[1] and both else "")

    keys = []
    for r in rows:
        k = (r["layer"], r["sparsity"], r["batch"], r["threads"], r["dtype"])
        if k not in keys:
            keys.append(k)
    by = {(r["layer"], r["sparsity"], r["batch"], r["threads"], r["dtype"], r["form"], r["compiled"]): r for r in rows}
    head = ["layer", "sparsity", "batch", "threads", "dtype"] + [label(c) for c in cols] + \
        ["condensed vs dense", "condensed vs CSR", "fastest (same layer)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    same_layer = ("dense", "ablated_dense", "condensed", "csr", "deepsparse")
    for k in keys:
        pct = 100 * k[1]
        cells = [k[0], f"{pct:.0f}%" if abs(pct - round(pct)) < 1e-9 else f"{pct:.2f}%", str(k[2]),
                 str(k[3]) if k[3] != "" else "-", k[4]]
        for c in cols:
            r = by.get((*k, *c))
            cells.append(_fmt_us(r["median_us"]) if r else "-")
        ratios = []
        for other in ("dense", "csr"):
            vals = []
            for comp in sorted({c[1] for c in cols}):
                rc, ro = by.get((*k, "condensed", comp)), by.get((*k, other, comp))
                tag = " (c)" if comp and both else ""
                if ro is None and comp:  # CSR cannot be compiled: compare with what a user would run
                    ro, tag = eager_csr.get(k) if other == "csr" else None, " (vs eager CSR)"
                if rc and ro:
                    vals.append(f"{ro['median_us'] / rc['median_us']:.2f}x" + tag)
            ratios.append(" / ".join(vals) if vals else "-")
        cand = [(r["median_us"], c) for c in cols if c[0] in same_layer and (r := by.get((*k, *c)))]
        best = min(cand)[1] if cand else None
        cells += ratios + [label(best) if best else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tables(result: dict) -> str:
    """The README's tables: one markdown table per variant (eager, then compiled), with headings."""
    out = []
    for compiled in (False, True):
        if any(r["compiled"] == compiled and r.get("status") == "ok" for r in result["rows"]):
            mode = result["meta"].get("config", {}).get("compile", "max-autotune")
            out.append(f"### {'torch.compile(mode=' + repr(mode) + ')' if compiled else 'eager'}\n")
            out.append(markdown_table(result, compiled=compiled))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command line (shared by bench/layer.py and `sparse-compile bench layer`)
# ---------------------------------------------------------------------------------------------


def add_layer_arguments(p: argparse.ArgumentParser) -> None:
    """The layer benchmark's options (lists are space-separated: ``--batches 1 8``)."""
    p.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), metavar="OUTxIN",
                   help="weight shapes, out x in (default: ViT-B/16 fc2 768x3072 and fc1 3072x768)")
    p.add_argument("--sparsities", nargs="+", type=float, default=list(DEFAULT_SPARSITIES))
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help=f"default: CPU {' '.join(map(str, CPU_BATCHES))}; GPU {' '.join(map(str, GPU_BATCHES))}")
    p.add_argument("--threads", nargs="+", type=int, default=None, help="CPU thread counts (default: 1 and all cores)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(_DTYPES), help="default: CPU fp32; GPU fp32 bf16")
    p.add_argument("--forms", nargs="+", default=list(LayerBenchConfig.forms), choices=FORMS)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--compile", default=None, choices=["none", "default", "max-autotune"],
                   help="also time each form under torch.compile in this mode (default max-autotune; "
                        "'none' for eager only: on a GPU, max-autotune autotunes every GEMM shape, minutes per run)")
    p.add_argument("--ablated-fraction", type=float, default=0.1,
                   help="random weights: fraction of neurons ablated, as a trained SRigL layer has (default 0.1)")
    p.add_argument("--checkpoint", default=None, help="trained SRigL state dict (.safetensors / .pt): bench its layer")
    p.add_argument("--layer", dest="checkpoint_layer", default=None, help="layer name in --checkpoint (e.g. encoder.layers.11.mlp.3)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timed calls per configuration")
    p.add_argument("--quick", action="store_true", help="one short measurement per configuration (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out", help="directory for the JSON and CSV (default bench/out)")
    p.add_argument("--name", default=None, help="file name stem (default layer-<device>-<date>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> LayerBenchConfig:
    """A :class:`LayerBenchConfig` from parsed :func:`add_layer_arguments` options."""
    return LayerBenchConfig(
        layers=tuple(args.layers), sparsities=tuple(args.sparsities),
        batches=tuple(args.batches) if args.batches else None,
        threads=tuple(args.threads) if args.threads else None,
        dtypes=tuple(args.dtypes) if args.dtypes else None,
        forms=tuple(args.forms), device=args.device, compile=args.compile,
        ablated_fraction=args.ablated_fraction, checkpoint=args.checkpoint,
        checkpoint_layer=args.checkpoint_layer, quick=args.quick, min_run_time=args.min_run_time, seed=args.seed,
    )


def run_layer_args(args) -> int:
    """Run from parsed options: write JSON + CSV, print the table; exit code 1 if a form was wrong."""
    result = run_layer_bench(config_from_args(args), progress=not args.no_progress)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = args.name or f"layer-{torch.device(args.device).type}-{stamp}"
    jpath, cpath = write_results(args.out, name, result["meta"], result["rows"])
    m = result["meta"]["machine"]
    print(f"# {m['cpu_model'] if m['gpu_name'] is None else m['gpu_name']}, torch {m['torch']}, "
          f"triton {m['triton']}, {m['date']}; condensed: {m['condensed_impl']}")
    print(tables(result))
    skipped = {(r["form"], r["note"]) for r in result["rows"] if r["status"] in ("skipped", "error")}
    for f, note in sorted(skipped):
        print(f"- {FORM_LABELS[f]}: {note}")
    print(f"wrote {jpath} and {cpath}")
    bad = [r for r in result["rows"] if r["status"] == "wrong"]
    if bad:
        print(f"error: {len(bad)} configuration(s) gave outputs that do not match the dense reference", file=sys.stderr)
        return 1
    return 0


def layer_main(argv=None) -> int:
    """``python -m bench.layer`` entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__.split("\n\n")[0])
    add_layer_arguments(p)
    try:
        return run_layer_args(p.parse_args(argv))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"bench layer: error: {e}", file=sys.stderr)
        return 2
