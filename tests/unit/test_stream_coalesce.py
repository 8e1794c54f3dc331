"""The streamer joins each job's consecutive pieces into one entry, and nothing else."""

from __future__ import annotations

import itertools
import random

from worker.engine.api import TextDelta
from worker.service.streamer import coalesce


def _pieces(job: str, text: str, cuts: list[int], end: str | None = "stop") -> list[TextDelta]:
    bounds = [0, *cuts, len(text)]
    return [
        TextDelta(job, a, text[a:b], end if b == len(text) else None)
        for a, b in itertools.pairwise(bounds)
    ]


def test_steps_of_several_jobs_become_one_entry_per_job_with_the_same_text() -> None:
    a = _pieces("a", "Hello there, world", [5, 11])
    b = _pieces("b", "Bonjour", [3], end=None)  # still running
    interleaved = [a[0], b[0], a[1], b[1], a[2]]
    assert coalesce(interleaved) == [
        TextDelta("a", 0, "Hello there, world", "stop"),
        TextDelta("b", 0, "Bonjour", None),
    ]


def test_a_later_batch_continues_where_the_job_was() -> None:
    later = _pieces("a", "Hello there, world", [5, 11])[1:]
    assert coalesce(later) == [TextDelta("a", 5, " there, world", "stop")]


def test_a_new_run_a_gap_and_a_piece_after_the_end_stay_apart() -> None:
    rerun = TextDelta("a", 0, "Hi")  # the job's new run (a takeover): its stream is cleared
    first = TextDelta("a", 0, "Hello")
    gap = TextDelta("a", 9, "x")  # not where the text was: kept as sent
    after_end = [TextDelta("b", 0, "ok", "stop"), TextDelta("b", 2, "!")]
    deltas = [first, rerun, TextDelta("a", 2, " you"), gap, *after_end]
    assert coalesce(deltas) == [
        first,
        TextDelta("a", 0, "Hi you"),
        gap,
        *after_end,
    ]


def test_joined_pieces_read_back_as_the_text() -> None:
    rng = random.Random(7)
    texts = {f"job-{i}": "".join(rng.choice("ab c.é😀") for _ in range(40)) for i in range(5)}
    deltas = [
        d
        for job, text in texts.items()
        for d in _pieces(job, text, sorted(rng.sample(range(1, 40), 8)))
    ]
    rng.shuffle(deltas)  # other jobs' pieces in between; each job's own order kept below
    deltas.sort(key=lambda d: (d.seq_id, d.start))
    for d in coalesce(deltas):
        assert d.start == 0 and d.text == texts[d.seq_id] and d.end == "stop"
