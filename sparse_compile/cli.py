"""The ``sparse-compile`` command line.

A user mistake (a missing or unreadable file, a bad option value) prints one line,
``sparse-compile COMMAND: error: ...``, and exits with status 1; ``--traceback`` (anywhere on the
command line) or ``SPARSE_COMPILE_TRACEBACK=1`` shows the full Python trace instead.

Each subcommand lives in its own module under ``sparse_compile/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args,
returning an exit code). Modules are discovered, so adding a command touches no other file.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

from . import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every discovered subcommand."""
    p = argparse.ArgumentParser(
        prog="sparse-compile",
        description="Train SRigL sparse networks and compile them into their fastest form.",
    )
    p.add_argument("--version", action="version", version=f"sparse-compile {__version__}")
    p.add_argument("--traceback", action="store_true",
                   help="on an error, print the full Python trace (also: SPARSE_COMPILE_TRACEBACK=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return p


_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError)


def _is_user_error(e: BaseException) -> bool:
    return isinstance(e, _USER_ERRORS)


def _message(e: BaseException) -> str:
    """One line for the user: the exception's first non-empty line (with its type for other errors)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = f"missing key {e.args[0]!r}"
    if _is_user_error(e):
        return msg or type(e).__name__
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def main(argv=None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --traceback is accepted anywhere (before or after the subcommand's own options).
    show_trace = "--traceback" in argv or os.environ.get("SPARSE_COMPILE_TRACEBACK", "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"sparse-compile {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a user's mistake or a fault: one clear line unless asked for the trace
        if show_trace:
            traceback.print_exc()
        hint = "" if show_trace or _is_user_error(e) else " (--traceback shows where)"
        print(f"sparse-compile {args.command}: error: {_message(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
