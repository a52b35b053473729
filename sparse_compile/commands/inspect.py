"""``sparse-compile inspect CHECKPOINT_OR_MODEL_NAME``."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    """Add the ``inspect`` subcommand."""
    p = sub.add_parser("inspect", help="per-layer sparsity, fan-in and ablation of a checkpoint, model or .sc file")
    p.add_argument("target", help="checkpoint file (.safetensors / .pt state dict), an optimized model file "
                                   "(written by optimize / sparse_compile.save), 'example', or a model name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def load_target(target: str):
    """A model or state dict for ``target``: a file path, the shipped 'example', or a registry name."""
    from ..checkpoint import load_state_dict, example_path

    if target == "example":
        return load_state_dict(example_path())
    path = Path(target)
    if path.exists():
        return load_state_dict(path)
    from sparse_compile.models import create_model, list_models

    if target in list_models():
        return create_model(target)
    raise FileNotFoundError(f"{target!r} is neither a file, 'example', nor a registered model name")


def saved_model_layers(model) -> list:
    """One record per layer of a loaded optimized model: its form, shape and stored weight size."""
    from torch import nn

    from ..compiler import modules as M

    forms = {M.CondensedLinear: "condensed", M.CondensedConv2d: "condensed", M.CSRLinear: "csr",
             M.CSRConv2d: "csr", M.StructuredLinear: "ablated_dense", M.StructuredConv2d: "ablated_dense"}
    module_nbytes = M.module_nbytes
    rows = []
    for name, m in model.named_modules():
        form = forms.get(type(m))
        if form is None and isinstance(m, (nn.Linear, nn.Conv2d)):
            form = "dense"
        if form is None:
            continue
        conv = hasattr(m, "kernel_size")
        n_in = m.in_channels if conv else m.in_features
        n_out = m.out_channels if conv else m.out_features
        row = {"name": name, "form": form, "kind": "conv2d" if conv else "linear", "in": int(n_in),
               "out": int(n_out), "bytes": module_nbytes(m)}
        if form == "condensed":
            row["k"] = m.k
        elif form == "csr":
            row["nnz"] = m.nnz
        elif form in ("dense", "ablated_dense"):
            w = m.weight
            row["nonzero"] = int((w != 0).sum())
        rows.append(row)
    return rows


def _table(rows: list) -> str:
    head = ("layer", "form", "kind", "in", "out", "k / nnz", "KB")
    body = [(r["name"], r["form"], r["kind"], str(r["in"]), str(r["out"]),
             str(r.get("k", r.get("nnz", r.get("nonzero", "")))), f"{r['bytes'] / 1024:.1f}") for r in rows]
    w = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    total = sum(r["bytes"] for r in rows)
    counts = {}
    for r in rows:
        counts[r["form"]] = counts.get(r["form"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return "\n".join([fmt(head), "  ".join("-" * x for x in w), *map(fmt, body),
                      f"{len(rows)} layers ({summary}), {total / 1024:.1f} KB of layer weights"])


def run(args) -> int:
    """Print the inspect table (or JSON)."""
    from ..checkpoint import is_saved_model
    from ..analysis.inspect import inspect

    path = Path(args.target)
    if path.is_file() and is_saved_model(path):
        from ..compiler.serialize import load

        model = load(path)
        rows = saved_model_layers(model)
        rep = getattr(model, "sparse_compile_report", None)
        if args.json:
            print(json.dumps({"file": str(path), "optimized": True, "layers": rows,
                              "report": rep.to_dict() if rep is not None else None}, indent=2))
        else:
            print(f"{path}: optimized model (sparse_compile.save)")
            print(_table(rows))
        return 0
    rep = inspect(load_target(args.target))
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep)
    return 0
