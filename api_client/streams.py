"""Reading a job's text stream (`inferq:stream:<job id>`), without I/O: `InferqClient.stream`
and `AsyncInferqClient.stream` drive one `StreamReader` each, with blocking or asyncio Redis.

The worker appends one entry per engine step that added text: `o` (how many characters of
the text came before it) and `d` (the text); the step that ends generation adds `end` (its
finish reason), and a job that ends without a result gets `end` (its status) from the worker
that records it. Entries are read from the start, so a reader that comes late gets the text
so far first. Joined, what a reader yields is the job's result text: where the stream cannot
say (it has a gap, is gone, or streaming is off), the reader takes the rest from the result.
"""

from __future__ import annotations

import uuid
from typing import Any

from api_client.producer import tenant_view
from api_client.results import job_error, result_key, stream_key
from storage.records import TERMINAL_STATUSES, JobStatus

GENERATION_ENDS = ("stop", "length")  # `end` of the engine's last entry (a finish reason)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class StreamReader:
    """One job's stream, entry by entry; `finished` once the job's whole text was handed out
    (or its error is known: `rest` raises it)."""

    COUNT = 1000  # entries per read

    def __init__(self, job_id: uuid.UUID, tenant: str) -> None:
        self.job_id, self.tenant = job_id, tenant
        self.key, self.result_key = stream_key(job_id), result_key(job_id)
        self.last_id: bytes | str = "0-0"
        self.received = 0  # characters handed out
        self.finished = False
        self._from_result = False  # the stream cannot say the rest: the result will
        self._tail = ""  # the rest, from the result
        self._error: Exception | None = None

    def block_ms(self, poll_s: float, left_s: float) -> int:
        """How long one read may block: a poll interval (then the result is read), at most."""
        return max(1, int(min(poll_s, left_s) * 1000))

    def feed(self, entries: list[tuple[Any, dict[Any, Any]]]) -> list[str]:
        """The text these entries add, as one piece (a late reader's first read: the text so
        far)."""
        out: list[str] = []
        for entry_id, raw in entries:
            self.last_id = entry_id
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if "d" in fields and not self._from_result:
                out += self._delta(fields)
            end = fields.get("end")
            if end in GENERATION_ENDS and not self._from_result:
                self.finished = True
                break
            if end is not None:  # it ended otherwise (or the text has a gap): ask the result
                self._from_result = True
        return ["".join(out)] if out else []

    def _delta(self, fields: dict[str, str]) -> list[str]:
        try:
            start = int(fields.get("o", ""))
        except ValueError:
            start = -1
        if not 0 <= start <= self.received:  # entries are missing: the result has the rest
            self._from_result = True
            return []
        piece = fields["d"][self.received - start :]  # a rerun's text repeats: from where we are
        self.received += len(piece)
        return [piece] if piece else []

    def wants_result(self, got_entries: bool) -> bool:
        """Whether to read the result now: the stream was quiet for a poll interval, or it
        cannot say the rest."""
        return not self.finished and (self._from_result or not got_entries)

    def result(self, raw: bytes | str | None) -> None:
        """Read the job's result key: once the job has ended, the reader is finished."""
        view = tenant_view(raw, self.job_id, self.tenant)
        if view is None or view.status not in TERMINAL_STATUSES:
            return
        if view.status == JobStatus.DONE and view.result is not None:
            self._tail = view.result.text[self.received :]
        else:
            self._error = job_error(view)
        self.finished = True

    def rest(self) -> list[str]:
        """The text only the result had; raises the job's error if it ended without one."""
        if self._error is not None:
            raise self._error
        tail, self._tail = self._tail, ""
        self.received += len(tail)
        return [tail] if tail else []
