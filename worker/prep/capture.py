"""The trap for the libraries' output: while model preparation (or a worker's model load)
runs, everything written to stdout/stderr, by this process at the C level or by its children
(pip, transformers, gguf, gptqmodel's logger and per-layer tables, tqdm bars, warnings), lands
in a log file under INFERQ_HOME/logs (worker/prep/progress.py draws our own lines)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def log_path_for(home: Path, kind: str) -> Path:
    """`$INFERQ_HOME/logs/<kind>-<timestamp>.log` (the folder is created)."""
    folder = Path(home) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{kind}-{stamp}.log"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{kind}-{stamp}-{n}.log"
    return path


@contextlib.contextmanager
def capture_output(
    log_path: Path, *, level: str = "INFO", library_logs: bool = True
) -> Iterator[IO[str]]:
    """Send everything written to stdout/stderr into `log_path` for the duration.

    File descriptors 1 and 2 are pointed at the log (so C extensions and child processes
    land there too), `sys.stdout`/`sys.stderr` become line-buffered writers on those
    descriptors (warnings and tqdm bars follow), loggers get a timestamped handler (unless
    `library_logs` is false: the caller has its own); all are put back on exit. An exception
    leaving the block has its traceback written to the log first.
    """
    from inferq.logs import send_library_logs_to

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    old_streams = sys.stdout, sys.stderr
    root = logging.getLogger()
    old_level = root.level
    old_showwarning = warnings.showwarning
    handler = None
    # Libraries that stop propagation (transformers' own root logger) get the handler too.
    closed = [
        lg
        for lg in logging.root.manager.loggerDict.values()
        if isinstance(lg, logging.Logger) and not lg.propagate
    ]
    try:
        for fd in (1, 2):
            os.dup2(log_fd, fd)
        sys.stdout = open(1, "w", buffering=1, errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, errors="replace", closefd=False)  # noqa: SIM115
        if library_logs:
            handler = send_library_logs_to(sys.stderr, level=level)
            for lg in closed:
                lg.addHandler(handler)
        warnings.showwarning = _warning_to_stderr
        try:
            yield sys.stderr
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            raise
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(old_level)
            for lg in closed:
                lg.removeHandler(handler)
        warnings.showwarning = old_showwarning
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        # Writers handed out meanwhile stay valid: they write to fds 1/2, the terminal again.
        sys.stdout, sys.stderr = old_streams


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` while captured: to the log, whatever hook was there before."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
