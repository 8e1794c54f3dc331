"""Issue 25 on the engine side, without services: tiny temperatures are clamped at
validation, a row with no valid distribution fails alone, and the deadline heap forgets
finished jobs."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import torch

from api_client.schema import JobMessage
from inferq.params import MIN_TEMPERATURE, SamplingParams
from worker.engine.null import NullEngine
from worker.engine.sampling import INVALID, make_generator, sample_next
from worker.service.engine_loop import DEADLINE_SLACK, EngineLoop
from worker.service.jobs import LiveJob
from worker.service.metrics import Metrics
from worker.service.outcomes import Finished


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (0.0, 0.0),
        (1e-300, MIN_TEMPERATURE),
        (1e-45, MIN_TEMPERATURE),
        (5e-3, MIN_TEMPERATURE),
        (MIN_TEMPERATURE, MIN_TEMPERATURE),
        (0.7, 0.7),
        (5.0, 5.0),
    ],
)
def test_tiny_temperature_is_clamped_at_validation(sent: float, kept: float) -> None:
    assert SamplingParams(temperature=sent).temperature == kept
    job = JobMessage(prompt="hi", params={"temperature": sent})
    assert job.params.temperature == kept
    assert str(MIN_TEMPERATURE) in str(SamplingParams.model_fields["temperature"].description)


def test_tiny_temperature_row_is_marked_invalid_alone_and_greedy_rows_unchanged() -> None:
    """A 1e-45 temperature (params that skipped validation) or a NaN row gets INVALID
    instead of raising; the other rows draw exactly what they draw without them."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 5
    unvalidated = SamplingParams.model_construct(temperature=1e-45, seed=1)
    params = [
        SamplingParams(),
        unvalidated,
        SamplingParams(temperature=0.8, seed=2),
        SamplingParams(),
    ]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    tokens = sample_next(logits.clone(), params, gens).tolist()
    assert tokens[1] == INVALID
    clean = [params[0], params[2], params[3]]
    alone = sample_next(
        logits[[0, 2, 3]].clone(), clean, [make_generator(p, torch.device("cpu")) for p in clean]
    )
    assert [tokens[0], tokens[2], tokens[3]] == alone.tolist()
    poisoned = logits.clone()
    poisoned[3, 7] = float("nan")
    assert sample_next(poisoned, [SamplingParams()] * 4, [None] * 4).tolist() == [
        *logits[:3].argmax(-1).tolist(),
        INVALID,
    ]


def test_deadline_heap_stays_bounded_after_many_finished_long_ttl_jobs() -> None:
    """Finding 8: 5,000 jobs with a 30-day deadline finish; the heap keeps about the live
    jobs' entries, not one per finished job for 30 days."""
    outcomes: list = []
    loop = EngineLoop({"null": NullEngine()}, outcomes.append, Metrics())
    month = datetime.now(UTC) + timedelta(days=30)
    n = 5000
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(lambda: not stop.is_set(),))
    runner.start()
    try:
        params = SamplingParams(max_tokens=2)
        for _ in range(n):
            job = LiveJob(seq_id=uuid.uuid4(), prompt_ids=[1, 2, 3], params=params, model="null")
            loop.submit(job, expires_at=month)
        deadline = time.monotonic() + 60
        while sum(isinstance(o, Finished) for o in outcomes) < n:
            assert time.monotonic() < deadline, "jobs did not finish"
            time.sleep(0.01)
        time.sleep(3 * 0.1)  # an idle turn or two
        assert len(loop._deadlines) <= DEADLINE_SLACK
    finally:
        stop.set()
        runner.join(10)
