"""Issue 25, the database side of claims: a job id names one job of one tenant (finding 1), a
job running live stays with its worker (3), liveness runs on the database's clock (7), and a
job the sweeper keeps sending again fails (6). Storage tests run on PostgreSQL and SQLite;
service tests run workers in this process (null engines) on the real Redis and PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import redis
import service_helpers as helpers
import sqlalchemy as sa
from service_helpers import producer, records, running_worker, wait_for, wait_status

from api_client import InferqClient
from api_client.wire import celery_priority
from storage.models import jobs_table
from storage.records import JobStatus, NewJob
from storage.repository import Repository
from storage.sweeps import Sweeps
from worker.broker import queue_depth
from worker.engine.null import NullEngine
from worker.service.app import WorkerService

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TASK = "inferq.generate"


def _job(**fields) -> NewJob:
    base = {
        "id": uuid.uuid4(),
        "tenant": f"alice-{uuid.uuid4().hex[:6]}",
        "model": "m",
        "prompt": "Alice's question",
        "params": {"max_tokens": 3},
        "priority": 1,
    }
    return NewJob(**{**base, **fields})


def _row(repo: Repository, job_id: uuid.UUID) -> dict:
    with repo.engine.connect() as conn:
        return dict(
            conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).one()._mapping
        )


# -- storage: PostgreSQL and SQLite --------------------------------------------------------


def test_job_id_of_another_tenant_never_changes_the_job(db_url: str) -> None:
    repo = Repository(db_url)
    alice = _job()
    repo.submit(alice)
    before = _row(repo, alice.id)
    hostile = [
        dataclasses.replace(alice, tenant="mallory", prompt="Mallory's words"),
        dataclasses.replace(alice, tenant="mallory", model="no-such-model"),
        dataclasses.replace(alice, params={"max_tokens": 9}),  # same tenant, other content
    ]
    for job in hostile:  # refused or not, a message of other content leaves the row be
        for refused in ({}, {job.id: "unknown model"}):
            state = repo.claim([job], "w-mallory", refused)[alice.id]
            assert not state.is_job_of(job) and state.status == JobStatus.QUEUED
    assert _row(repo, alice.id) == before
    # the job's own message (a resend or the client's send: other times, same content) runs
    resend = dataclasses.replace(alice, queued_at=T0, expires_at=None, enqueued_at=T0)
    state = repo.claim([resend], "w-alice")[alice.id]
    assert state.is_job_of(resend) and (state.status, state.attempts) == ("running", 1)
    # two messages with one id in one claim: the first decides, the second is compared
    bob = _job(tenant="bob")
    states = repo.claim([bob, dataclasses.replace(bob, tenant="mallory")], "w")
    assert states[bob.id].is_job_of(bob) and _row(repo, bob.id)["tenant"] == "bob"


def test_a_live_job_is_not_taken_over(db_url: str) -> None:
    repo = Repository(db_url)
    sweeps = Sweeps(repo)
    suffix = uuid.uuid4().hex[:6]
    live, silent, fresh, dup = (f"{n}-{suffix}" for n in ("live", "silent", "fresh", "dup"))
    sweeps.heartbeat(live, ["m"])
    on_live, on_fresh, on_silent = _job(), _job(), _job()
    repo.claim([on_live], live)
    repo.claim([on_fresh], fresh)  # started just now: live before its worker's first beat
    repo.claim([on_silent], silent, now=datetime.now(UTC) - timedelta(seconds=120))
    states = repo.claim([on_live, on_fresh, on_silent], dup, live_for_s=60)
    assert (states[on_live.id].worker, states[on_live.id].attempts) == (live, 1)
    assert (states[on_fresh.id].worker, states[on_fresh.id].attempts) == (fresh, 1)
    assert (states[on_silent.id].worker, states[on_silent.id].attempts) == (dup, 2)
    # a claim repeated by the job's own worker (after a database error) counts no attempt
    assert repo.claim([on_live], live)[on_live.id].attempts == 1
    sweeps.heartbeat(live, ["m"], stopped=True)  # a worker that stopped is not alive
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert repo.claim([on_live], dup, now=later, live_for_s=60)[on_live.id].worker == dup


def test_a_job_resent_max_resends_times_fails_with_a_reason(db_url: str) -> None:
    repo = Repository(db_url)
    sweeps = Sweeps(repo)
    lost, orphan = _job(queued_at=T0), _job(queued_at=T0)
    repo.submit(lost)
    repo.claim([orphan], f"dead-{uuid.uuid4().hex[:6]}", now=T0)
    mine = {lost.id, orphan.id}
    for n in range(3):
        now = T0 + timedelta(seconds=61 * (n + 1))
        sent = {j.id for j in sweeps.requeue(30, 60, now=now, max_resends=3)}
        assert mine <= sent
        repo.claim([orphan], f"dead-{uuid.uuid4().hex[:6]}", now=now)  # and its worker dies
    sent = {j.id for j in sweeps.requeue(30, 60, now=T0 + timedelta(seconds=300), max_resends=3)}
    assert not mine & sent
    for job_id in mine:
        view = repo.get(job_id)
        assert view is not None and view.status == "failed" and view.metrics is not None
        assert "sent again 3 times" in (view.error or "")
        assert _row(repo, job_id)["resends"] == 3


# -- service: workers on Redis and PostgreSQL ------------------------------------------------


class GatedEngine(helpers.GatedEngine):
    """The gated null engine that remembers what it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[uuid.UUID] = []

    def add(self, request) -> None:
        self.added.append(request.seq_id)
        super().add(request)


def _settings(service_settings, name: str, **extra):
    return service_settings.model_copy(
        update={
            "model": "null",
            "worker_name": f"{name}-{uuid.uuid4().hex[:6]}",
            "affinity": False,
            "heartbeat_s": 0.2,
            **extra,
        }
    )


def _drained(settings, *services: WorkerService, timeout: float = 20.0) -> None:
    """Nothing waits on the queue and no worker holds a message it has not settled."""
    client = redis.Redis.from_url(settings.broker_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not queue_depth(client, settings.queue) and all(
            len(s.intake._unacked) <= len(s.ledger) for s in services
        ):
            time.sleep(0.5)  # a message taken is claimed and settled within this
            return
        time.sleep(0.05)
    raise AssertionError("messages still waiting")


def _wait_running(repo: Repository, job_id: uuid.UUID, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while repo.statuses([job_id]).get(job_id) != "running":
        assert time.monotonic() < deadline, repo.statuses([job_id])
        time.sleep(0.02)


@pytest.mark.services
@pytest.mark.parametrize("alice_done", [False, True], ids=["while-it-runs", "once-done"])
def test_job_id_of_another_tenant_is_refused(service_settings, alice_done: bool) -> None:
    """The reproduced takeover: alice's job submitted through the client and claimed,
    mallory's plain send_task with alice's job id (her own prompt; an unknown model), sent
    while alice's job runs or once it is done: alice's job runs hers, her result on Redis
    stays hers, mallory's messages are "job id taken". (Before any worker has claimed an id,
    the first message to name it makes the job: docs/security.md, job ids.)"""
    settings = _settings(service_settings, "w")
    alice = InferqClient(settings, tenant="alice")
    prompt = "Alice's question, in full"
    gated = GatedEngine()
    if alice_done:
        gated.gate.set()
    app = producer(settings)
    with running_worker(settings, {"null": gated}) as service:
        job_id = alice.submit(prompt, params={"max_tokens": 3})
        wait_status(alice, job_id, "done" if alice_done else "running", timeout=30)
        kwargs = {
            "job_id": str(job_id),
            "tenant": "mallory",
            "prompt": "Mallory's words",
            "params": {"max_tokens": 7},
            "priority": 9,
        }
        for extra in ({}, {"model": "no-such-model"}):
            app.send_task(
                TASK,
                queue=settings.queue,
                kwargs={**kwargs, **extra},
                priority=celery_priority(kwargs["priority"]),
            )
        _drained(settings, service)
        gated.gate.set()
        view = wait_for(service.repo, [job_id], timeout=30)[job_id]
    mine = alice.get(job_id)
    assert mine is not None and (mine.status, mine.tenant, mine.attempts) == ("done", "alice", 1)
    assert mine.result is not None and mine.result.prompt_tokens == len(prompt.encode())
    assert mine.result.completion_tokens == 3 and view.error is None
    assert alice.for_tenant("mallory").get(job_id) is None
    letters = [d for d in service.repo.dead_letters(1000) if d["job_id"] == job_id]
    assert sorted(d["reason"] for d in letters) == ["job id taken"] * 2


@pytest.mark.services
def test_a_duplicate_of_a_job_running_live_elsewhere_is_not_run(service_settings) -> None:
    """A duplicate message (a redelivery, a resend) for a job that runs on a live worker is
    acknowledged by the other worker without running it or counting an attempt."""
    first = _settings(service_settings, "first", max_attempts=1)
    second = _settings(service_settings, "second", max_attempts=1)
    client = InferqClient(first)
    gated, other = GatedEngine(), GatedEngine()
    other.gate.set()
    with ExitStack() as stack:
        one = stack.enter_context(running_worker(first, {"null": gated}))
        job_id = client.submit("Hold me a while.", params={"max_tokens": 4})
        _wait_running(records(first), job_id)
        one.intake.taking.clear()  # the duplicate goes to the other worker
        two = stack.enter_context(running_worker(second, {"null": other}))
        msg = client.build("Hold me a while.", params={"max_tokens": 4})
        duplicate = msg.model_copy(update={"job_id": job_id}).to_wire()
        producer(first).send_task(TASK, queue=first.queue, kwargs=duplicate)
        _drained(first, one, two)
        gated.gate.set()
        view = wait_for(records(first), [job_id], timeout=30)[job_id]
    assert (view.status, view.attempts, view.worker) == ("done", 1, one.worker)
    assert other.added == [] and gated.added == [job_id]
    with records(first).engine.connect() as conn:
        results = conn.scalar(
            sa.text("SELECT count(*) FROM results WHERE job_id = :i"), {"i": job_id}
        )
    assert results == 1


@contextmanager
def _fast_clock(service: WorkerService, skew_s: float, monkeypatch) -> Iterator[None]:
    """The host clock functions the worker modules read run `skew_s` fast on the threads of
    `service` (the other workers in this process keep the true time)."""
    import storage.records
    import storage.repository
    import storage.sweeps
    import worker.service.intake
    import worker.service.sink
    import worker.service.sweeper

    true_now = storage.records.utcnow
    threads = {
        service.sweeper.thread,
        service._intake_thread,
        service.sink.thread,
        service.engine_loop.thread,
    }

    def skewed() -> datetime:
        fast = threading.current_thread() in threads
        return true_now() + timedelta(seconds=skew_s if fast else 0)

    for module in (
        storage.records,
        storage.repository,
        storage.sweeps,
        worker.service.intake,
        worker.service.sink,
        worker.service.sweeper,
    ):
        monkeypatch.setattr(module, "utcnow", skewed, raising=False)
    yield


@pytest.mark.services
def test_a_worker_with_a_fast_clock_takes_over_and_requeues_nothing(
    service_settings, monkeypatch
) -> None:
    """Two workers, one 60 s fast and sweeping every 0.2 s with a 30 s dead-after: the other's
    running job is neither requeued nor taken over."""
    normal = _settings(service_settings, "normal", worker_dead_after_s=30.0)
    fast = _settings(service_settings, "fast", worker_dead_after_s=30.0)
    client = InferqClient(normal)
    gated = GatedEngine()
    with ExitStack() as stack:
        one = stack.enter_context(running_worker(normal, {"null": gated}))
        job_id = client.submit("Hold me a while.", params={"max_tokens": 4})
        _wait_running(records(normal), job_id)
        one.intake.taking.clear()
        skewed = WorkerService(fast, engines={"null": NullEngine()})
        stack.enter_context(_fast_clock(skewed, 60.0, monkeypatch))
        stack.enter_context(skewed)
        time.sleep(3.0)  # many sweeps of the fast worker
        row = _row(records(normal), job_id)
        assert (row["status"], row["worker"], row["requeued_at"]) == ("running", one.worker, None)
        _drained(normal, one, skewed)
        gated.gate.set()
        view = wait_for(records(normal), [job_id], timeout=30)[job_id]
    assert (view.status, view.attempts, view.worker) == ("done", 1, one.worker)
    assert _row(records(normal), job_id)["resends"] == 0
