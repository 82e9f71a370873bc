"""What the user sees of a run: one timestamped line per phase and, on a terminal, a progress
bar with an ETA for each phase (process 0 only); library chatter goes to the run folder's log.txt."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]


def say(msg: str) -> None:
    """One timestamped line on stdout, flushed (a cluster log shows it at once)."""
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)


class Console:
    """What the user sees: one timestamped line per phase (flushed: a cluster log shows it at
    once) and, on a terminal, a progress bar with an ETA for each phase. Library output
    goes to the run folder's log.txt instead. `log` (tests) receives the lines instead."""

    def __init__(self, log: Log | None = None, bars: bool | None = None):
        self._log = log
        self.bars = (sys.stderr.isatty() if bars is None else bars) and log is None and _process_index() == 0

    def __call__(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        else:
            say(msg)

    def bar(self, total: int, desc: str):
        """A callable progress(n) advancing a bar of `total` units (a no-op off a terminal)."""
        if not self.bars:
            return _NoBar()
        from tqdm import tqdm

        return _Bar(tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit="seq"))


class _NoBar:
    def __call__(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def grow(self, n: int) -> None:
        pass


class _Bar(_NoBar):
    def __init__(self, bar):
        self.b = bar

    def __call__(self, n: int = 1) -> None:
        self.b.update(n)

    def grow(self, n: int) -> None:
        self.b.total += n
        self.b.refresh()

    def close(self) -> None:
        self.b.close()



def _process_index() -> int:
    import jax

    return jax.process_index()


def quiet_libraries() -> logging.handlers.MemoryHandler:
    """Library chatter (absl, orbax, jax, transformers, vLLM, warnings) goes to the run folder's
    log.txt, not the console: held in memory until the folder is known."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's loggers propagate to ours instead of printing
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(buffer)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return buffer


def route_library_logs(buffer: logging.handlers.MemoryHandler, out: Path, is_main: bool) -> None:
    """From now on the library chatter held by `buffer` (quiet_libraries) and all that follows
    goes to `out`/log.txt (process 0; the others drop it)."""
    try:
        import absl.logging

        logging.getLogger().removeHandler(absl.logging.get_absl_handler())
        absl.logging.get_absl_handler().setLevel(logging.CRITICAL + 1)
    except ImportError:
        pass
    try:
        import transformers.utils.logging as tlog

        tlog.disable_default_handler()
        tlog.enable_propagation()
    except ImportError:
        pass
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(out / "log.txt")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    buffer.setTarget(handler)
    buffer.flush()
    root = logging.getLogger()
    root.removeHandler(buffer)
    root.addHandler(handler)
