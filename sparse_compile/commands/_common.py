"""Argument checks shared by the subcommands: each turns a user mistake into one clear ValueError."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional


def parse_device(spec: str, flag: str = "--device"):
    """``torch.device`` for ``spec``; ``ValueError`` for a malformed name or a device this machine lacks."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {spec!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta") and not getattr(torch, dev.type, None):
        raise ValueError(f"{flag} {spec}: device type {dev.type!r} is not supported here")
    return dev


def check_output_file(out: Path, inputs: Iterable[Path] = (), force: bool = False, flag: str = "-o/--output") -> Path:
    """Refuse an output path that is a folder, is one of the inputs, or exists (unless ``force``)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give a file name (e.g. {out / 'model.sc.safetensors'})")
    for inp in inputs:
        inp = Path(inp)
        if out.resolve() == inp.resolve():
            raise ValueError(f"{flag} {out} is the input file; refusing to overwrite it (choose another name)")
    if out.exists() and not force:
        raise ValueError(f"{flag} {out} exists; pass --force to overwrite it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"{flag} {out}: {out.parent} is not a folder")
    return out


def check_input_file(path: Path, what: str = "checkpoint") -> Optional[Path]:
    """Refuse a folder or an empty file given where a file is expected."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {what} file")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a {what} file")
    return path


def parse_key_values(items: Iterable[str], flag: str) -> dict:
    """``KEY=VALUE`` strings into a dict; a VALUE that parses as JSON (``[1024,1024]``, ``3``, ``true``)
    is that value, anything else stays a string. A missing ``=`` is a ValueError naming ``flag``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
