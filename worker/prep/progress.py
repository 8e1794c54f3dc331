"""A small terminal view for model preparation.

`prep_session(log_path)` is what `inferq model prepare` runs in: the view draws one progress
line per stage (download, conversion, quantization) on the terminal, while everything else
written to stdout/stderr, by this process at the C level or by its children (pip,
transformers, gguf, gptqmodel's logger and per-layer tables, tqdm bars, warnings), lands in
the log file (worker/prep/capture.py). On a terminal each stage is a bar redrawn in place;
on anything else (CI logs, pipes) it is a few plain lines. Dependency-free on purpose: it
must keep drawing while file descriptors 1 and 2 point at the log.

The preparation code reports to `active_view()`, which is a no-op outside a session, so the
worker service and the tests prepare models exactly as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from worker.prep.capture import capture_output

BAR_WIDTH = 20
_MILESTONES = (0.25, 0.5, 0.75)  # plain-line mode: report these fractions once each


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_amount(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1e6:.1f}"
    return str(int(value))


def _unit_label(unit: str) -> str:
    return "MB" if unit == "bytes" else unit


class Stage:
    """One step of preparation: a label, optional `done/total` counts and a phase note."""

    def __init__(self, view: PrepView, name: str, detail: str, total: float | None, unit: str):
        self.view = view
        self.name = name
        self.detail = detail
        self.total = total
        self.unit = unit
        self.done: float = 0
        self.note = ""
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.failed = False
        self._milestones = list(_MILESTONES)
        self._first: tuple[float, float] | None = None  # (time, done) of the first progress

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    def left(self) -> float | None:
        """Seconds still to go at the pace since the first counted step (what came before it,
        imports and loading, is not a step); None until a second step is counted."""
        if self.finished is not None or not self.total or self._first is None:
            return None
        since, first = self._first
        if self.done <= first:
            return None
        pace = (time.perf_counter() - since) / (self.done - first)
        return pace * (self.total - self.done)

    def left_text(self) -> str:
        left = self.left()
        return "" if left is None else f"about {format_duration(left)} left"

    def update(
        self, done: float | None = None, total: float | None = None, note: str | None = None
    ) -> None:
        """Set progress (absolute) and/or the phase note; redraws on a terminal."""
        with self.view.lock:
            if total is not None:
                self.total = total
            if done is not None:
                self.done = done if self.total is None else min(done, self.total)
                if self._first is None and self.done > 0:
                    self._first = (time.perf_counter(), self.done)
            if note is not None:
                self.note = note
        self.view._changed(self)

    def counts(self) -> str:
        if self.total is None:
            return ""
        done, total = (_format_amount(v, self.unit) for v in (self.done, self.total))
        return f"{done}/{total} {_unit_label(self.unit)}"


class PrepView:
    """Draws stages on `stream` (the real terminal, even while fds 1 and 2 go to the log)."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, width: int | None = None):
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.width = width or _terminal_width(stream)
        self.lock = threading.RLock()
        self._stack: list[Stage] = []  # nested stages (a model prepared while loading one)
        self._last_draw = 0.0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def current(self) -> Stage | None:
        return self._stack[-1] if self._stack else None

    # -- plain text --------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """A line of our own output (headers, summaries, errors)."""
        with self.lock:
            if self.tty and self.current is not None:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            if self.tty and self.current is not None:
                self._draw(self.current)
            self.stream.flush()

    # -- stages ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(
        self, name: str, detail: str = "", *, total: float | None = None, unit: str = "steps"
    ) -> Iterator[Stage]:
        """Run one stage: drawn while it runs, one final line when it ends (or fails)."""
        stage = Stage(self, name, detail, total, unit)
        with self.lock:
            if self.tty and self._stack:
                self.stream.write("\n")  # the outer stage's line stays as it was
            self._stack.append(stage)
            if self.tty:
                self._draw(stage)
                self._start_ticker()
            else:
                self.stream.write(f"{name}: {detail} ...\n" if detail else f"{name} ...\n")
            self.stream.flush()
        try:
            yield stage
        except BaseException:
            self._end(stage, failed=True)
            raise
        self._end(stage, failed=False)

    def _end(self, stage: Stage, *, failed: bool) -> None:
        with self.lock:
            stage.finished = time.perf_counter()
            stage.failed = failed
            if failed:
                stage.note = "failed"
            elif stage.total is not None:
                stage.done = stage.total
                stage.note = ""
            else:
                stage.note = ""
            if stage in self._stack:
                self._stack.remove(stage)
            if self.tty:
                self._draw(stage)
                self.stream.write("\n")
            else:
                counts = stage.counts()
                what = "failed" if failed else "done"
                extra = f", {counts}" if counts and not failed else ""
                took = format_duration(stage.elapsed)
                self.stream.write(f"{stage.name}: {what}{extra} in {took}\n")
            self.stream.flush()

    def _changed(self, stage: Stage) -> None:
        with self.lock:
            if stage is not self.current:
                return
            if self.tty:
                now = time.perf_counter()
                if now - self._last_draw >= 0.1:
                    self._draw(stage)
                    self.stream.flush()
                return
            if stage.total:
                fraction = stage.done / stage.total
                passed = [m for m in stage._milestones if fraction >= m]
                if passed and fraction < 1:  # the stage's last line reports completion
                    stage._milestones = [m for m in stage._milestones if fraction < m]
                    took = ", ".join(
                        filter(None, [format_duration(stage.elapsed), stage.left_text()])
                    )
                    self.stream.write(f"{stage.name}: {stage.counts()} ({took})\n")
                    self.stream.flush()

    def render(self, stage: Stage) -> str:
        """The one-line picture of a stage (no carriage return)."""
        if stage.total:
            filled = round(BAR_WIDTH * stage.done / stage.total)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elif stage.finished is not None and not stage.failed:
            bar = "#" * BAR_WIDTH
        else:  # no total known: a block bouncing along the bar while it runs
            pos = int(stage.elapsed * 4) % (2 * BAR_WIDTH - 6)
            pos = pos if pos < BAR_WIDTH - 3 else 2 * BAR_WIDTH - 6 - pos
            bar = "-" * pos + "###" + "-" * (BAR_WIDTH - 3 - pos)
        parts = [f"{stage.name:<9}", f"[{bar}]"]
        if stage.counts():
            parts.append(stage.counts().rjust(15))
        parts.append(format_duration(stage.elapsed).rjust(6))
        if stage.left_text():
            parts.append(f"({stage.left_text()})")
        if stage.note:
            parts.append(stage.note)
        elif stage.detail:
            parts.append(stage.detail)
        text = " ".join(parts)
        return text[: self.width - 1]

    def _draw(self, stage: Stage) -> None:
        self._last_draw = time.perf_counter()
        self.stream.write("\r\033[K" + self.render(stage))

    def _start_ticker(self) -> None:
        """Keep the elapsed time moving on a terminal while a library call runs for minutes."""
        if self._ticker is not None:
            return

        def tick() -> None:
            while not self._stop.wait(0.5):
                with self.lock:
                    if self.current is not None:
                        self._draw(self.current)
                        with contextlib.suppress(OSError, ValueError):
                            self.stream.flush()

        self._ticker = threading.Thread(target=tick, name="inferq-progress", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None


class _NullStage:
    def update(self, done=None, total=None, note=None) -> None:
        pass


class NullView:
    """What preparation reports to outside a session: nothing is drawn."""

    tty = False

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "", *, total=None, unit: str = "steps"):
        yield _NullStage()

    def line(self, text: str) -> None:
        pass


_ACTIVE: PrepView | None = None  # a module global, not a contextvar: stages run in threads too


def active_view() -> PrepView | NullView:
    return _ACTIVE or NullView()


def is_active() -> bool:
    return _ACTIVE is not None


@contextlib.contextmanager
def activate(view: PrepView) -> Iterator[PrepView]:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, view
    try:
        yield view
    finally:
        _ACTIVE = previous


@contextlib.contextmanager
def prep_session(
    log_path: Path, stream: TextIO | None = None, *, library_logs: bool = True
) -> Iterator[PrepView]:
    """The view on the real terminal, with all other output captured into `log_path`."""
    own = stream is None
    if stream is None:
        stream = open(  # noqa: SIM115
            os.dup(sys.stderr.fileno()), "w", buffering=1, errors="replace"
        )
    view = PrepView(stream)
    try:
        with capture_output(log_path, library_logs=library_logs), activate(view):
            yield view
    finally:
        view.close()
        if own:
            stream.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _terminal_width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        columns = 0
    if columns <= 0:  # not a terminal, or one that reports no size (a bare pty)
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            columns = 100
    return max(columns, 40)
