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
``structured_only``    the paper's "structured" row: a *dense* weight (no fine-grained sparsity)
                       over the same active neurons, computing only those outputs. It is a
                       different layer (checked against its own reference); it shows what neuron
                       ablation alone buys. ``ablated_dense`` minus ``structured_only`` is the scatter.
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

import math
import os
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

from .. import numerics
from ..timing import num_threads, time_fn
from .results import FORMS, _condensed_impl, add_speedups, machine_info
from .weights import BenchWeights, checkpoint_layer, parse_shape, random_layer


DEFAULT_LAYERS = ("768x3072", "3072x768")

DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)

CPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)

GPU_BATCHES = (1, 256, 2048)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_form(form: str, lw: BenchWeights, device="cpu", dtype=torch.float32,
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

    if form == "structured_only":
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
    """:func:`sparse_compile.numerics.relative_error` of a form's output, ``inf`` when its shape is wrong.

    A form that returns the wrong shape is a wrong answer to record in its row, not an error to raise
    (the shared function raises on a shape mismatch).
    """
    if tuple(y.shape) != tuple(ref.shape):
        return float("inf")
    return numerics.relative_error(y, ref)


@dataclass
class LayerBenchConfig:
    """What :func:`run_layer_bench` measures. ``None`` fields take the device's defaults."""

    layers: Sequence[str] = DEFAULT_LAYERS
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    batches: Optional[Sequence[int]] = None  # CPU 1..64, GPU 1/256/2048
    threads: Optional[Sequence[int]] = None  # CPU: 1 and all cores; GPU: ignored
    dtypes: Optional[Sequence[str]] = None  # CPU fp32; GPU fp32, bf16
    forms: Sequence[str] = ("dense", "ablated_dense", "structured_only", "condensed", "csr", "semi_structured", "deepsparse")
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
            "structured_only": "paper's 'structured' row: dense weights on the active neurons only, active outputs only",
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
