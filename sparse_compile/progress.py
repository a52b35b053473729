"""Progress lines for the slow, silent moments: the first build of the C++ CPU kernels and
``optimize``'s timing in mode "auto". Quiet when the work is fast; written to stderr; silenced by
``SPARSE_COMPILE_QUIET=1``."""
from __future__ import annotations

import os
import sys
import threading
import time

__all__ = ["cpu_kernels", "slow", "Ticker", "quiet"]

#: Seconds of silence tolerated before a progress line appears.
DELAY_S = 1.0


def quiet() -> bool:
    """Whether progress lines are switched off (``SPARSE_COMPILE_QUIET`` set to anything but 0)."""
    return os.environ.get("SPARSE_COMPILE_QUIET", "") not in ("", "0")


def _say(text: str, end: str = "\n") -> None:
    if not quiet():
        print(text, end=end, file=sys.stderr, flush=True)


class slow:
    """Context manager: print ``message`` if the block is still running after :data:`DELAY_S`
    seconds, and how long it took when it ends (nothing at all for a fast block)."""

    def __init__(self, message: str, done: str = "done"):
        self.message, self.done_word = message, done
        self.shown = False

    def __enter__(self):
        self._done = threading.Event()
        self.t0 = time.perf_counter()

        def announce():
            if not self._done.wait(DELAY_S):
                self.shown = True
                _say(f"sparse_compile: {self.message} ...")

        self._th = threading.Thread(target=announce, daemon=True)
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._th.join()
        if self.shown:
            _say(f"sparse_compile: {self.done_word} in {time.perf_counter() - self.t0:.1f} s")
        return False


def cpu_kernels() -> bool:
    """Load the C++ CPU kernels (``sparse_compile.kernels.cpu.load``), saying so when it takes a while.

    The first use on a machine compiles them (about 20-30 s on 2 cores); a line says so after
    :data:`DELAY_S` seconds and another when the build ends. A cached load stays silent.
    """
    from .kernels import cpu

    if cpu.build_info().get("tried"):
        return cpu.is_loaded()
    with slow("loading the C++ CPU kernels (compiled on first use: about 20-30 s, then cached)",
              "C++ CPU kernels ready") as s:
        ok = cpu.load()
    if s.shown and not ok:
        _say("sparse_compile: the C++ CPU kernels are unavailable (see the warning above)")
    return ok


class Ticker:
    """One progress line over ``total`` items that appears only once the work has taken
    :data:`DELAY_S` seconds: rewritten in place on a terminal, else printed every few seconds."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.shown = False
        self.tty = sys.stderr.isatty()

    def tick(self, done: int, item: str = "") -> None:
        """Report that ``done`` of ``total`` items are finished (``item``: the next one's name)."""
        now = time.perf_counter() - self.t0
        if now < DELAY_S or (self.shown and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last, self.shown = now, True
        line = f"sparse_compile: {self.what} {done}/{self.total}" + (f" ({item})" if item else "") + f", {now:.0f} s"
        _say(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n")

    def close(self) -> None:
        """End the line, with the total time, if anything was shown."""
        if self.shown:
            now = time.perf_counter() - self.t0
            line = f"sparse_compile: {self.what} {self.total}/{self.total} done in {now:.1f} s"
            _say(("\r" + line.ljust(100)) if self.tty else line)
