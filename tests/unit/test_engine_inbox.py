"""The engine loop's inbox: typed messages (`Add`, `Abort`, `Stop`), applied in order on the
loop's own thread, on the model-free engine."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from inferq.params import SamplingParams
from worker.engine.null import NullEngine
from worker.service.engine_loop import EngineLoop
from worker.service.jobs import LiveJob
from worker.service.metrics import Metrics
from worker.service.outcomes import Dropped, Failed, Finished, Outcome


def _job(prompt: list[int] | None = None) -> LiveJob:
    params = SamplingParams(max_tokens=3)
    return LiveJob(seq_id=uuid.uuid4(), prompt_ids=prompt or [1, 2], params=params, model="null")


def _loop() -> tuple[EngineLoop, NullEngine, list[Outcome]]:
    outcomes: list[Outcome] = []
    engine = NullEngine()
    return EngineLoop({"null": engine}, outcomes.append, Metrics()), engine, outcomes


def _jobs(outcomes: list[Outcome]) -> list[tuple[str, uuid.UUID]]:
    """(kind, job id) of each job outcome, in order (usage reports left out)."""
    kinds = {Finished: "finished", Failed: "failed", Dropped: "dropped"}
    return [
        (kinds[type(o)], o.job.seq_id if isinstance(o, Finished) else o.job_id)
        for o in outcomes
        if type(o) in kinds
    ]


def test_messages_apply_in_order_and_stop_ends_the_run() -> None:
    """Add a, add b, abort b (by the job's UUID), add c with a deadline already past, stop:
    one turn applies them all, then the loop ends without stepping and hands back a."""
    loop, engine, outcomes = _loop()
    a, b, c = _job(), _job(), _job()
    loop.submit(a)
    loop.submit(b)
    loop.abort(b.seq_id)
    loop.submit(c, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    loop.stop()  # its thread is not started: the `run` below takes the Stop
    loop.run()
    assert _jobs(outcomes) == [("dropped", b.seq_id)]  # c expires only on a step turn
    assert not engine.has_work  # a and c, still live at the stop, were aborted


def test_a_running_loop_finishes_expires_and_fails_what_the_engine_refuses() -> None:
    loop, _, outcomes = _loop()
    a, late = _job(), _job()
    empty = LiveJob(seq_id=uuid.uuid4(), prompt_ids=[], params=a.params, model="null")
    loop.start()
    try:
        loop.submit(a)
        loop.submit(late, expires_at=datetime.now(UTC) - timedelta(seconds=1))
        loop.submit(empty)  # the engine refuses it: failed alone
        loop.abort(uuid.uuid4())  # an id nobody runs: nothing happens
        deadline = time.monotonic() + 10
        while len(_jobs(outcomes)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop(timeout=10)
    assert not loop.thread.is_alive()
    assert sorted(_jobs(outcomes)) == sorted(
        [("finished", a.seq_id), ("failed", late.seq_id), ("failed", empty.seq_id)]
    )
    failed = {o.job_id: o for o in outcomes if isinstance(o, Failed)}
    assert failed[late.seq_id].expired and not failed[empty.seq_id].expired


def test_a_bare_job_id_is_not_a_message() -> None:
    """The inbox once took a bare UUID to mean "abort"; now anything untyped is an error."""
    loop, _, _ = _loop()
    loop._inbox.put(uuid.uuid4())  # type: ignore[arg-type]
    loop.stop()  # were it taken for an abort, the run would end here instead
    with pytest.raises(TypeError, match="not an engine-loop message"):
        loop.run()
