"""Benchmark result files (JSON + CSV, with the machine they ran on) and their markdown tables."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..timing import cpu_model


FORMS = ("dense", "ablated_dense", "structured_only", "condensed", "csr", "semi_structured", "deepsparse")

FORM_LABELS = {
    "dense": "dense",
    "ablated_dense": "ablated-dense",
    "structured_only": "structured only",
    "condensed": "condensed",
    "csr": "CSR",
    "semi_structured": "2:4 semi-structured",
    "deepsparse": "DeepSparse",
}


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
    (same run, same variant) and the fastest form that computes the same layer (``structured_only`` and
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
