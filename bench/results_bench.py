"""Results benchmark: how long after a result's commit its waiter wakes up, and what waiting
costs PostgreSQL, polling the database (the client before issue 27: one query per waiting job
every 100 ms) vs waiting on Redis notifications (`InferqClient.wait`: the result key's
PUBLISH, a re-read every INFERQ_RESULT_POLL_S), with 1, 100 and 1,000 concurrent waiters.

Usage: .venv/bin/python bench/results_bench.py [--waiters 1,100,1000]
[--modes poll,notify,async] [--hold-s 3] [--out bench/out]
Needs the local Redis and PostgreSQL. Per mode and waiter count: a fresh database, a worker
in this process with a null engine that holds every job until released; N one-token jobs are
submitted and claimed, N waiters start waiting (one job each: a thread per waiter for
`poll` and `notify`; for `async`, one task per waiter on one event loop, the same waits
through `AsyncInferqClient`, as a FastAPI app's requests wait), and the jobs are held
for --hold-s more seconds (PostgreSQL's transactions/s are read over that window, from
`pg_stat_database`: xact_commit + xact_rollback of the benchmark's database, every session
included, the worker's own heartbeats too). Then the engine releases them all in one step:
the result sink commits them (a few transactions), the latency of each job is its waiter's
wake-up (`time.time()` when `wait` returned) minus the end of the transaction that committed
its result (wrapped `store_outcomes`, same process, same clock); "published" is when the
worker's write of the ended state (SET + PUBLISH, wrapped `ResultPublisher.write`) returned,
so the wake-up splits into the worker's part (commit to publish) and the client's. Each
waiter count first prints its floor (`wake_floor`: waking N idle threads, or N tasks, in one
process, nothing else done). Writes bench/out/results_bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from subprocess import PIPE

import sqlalchemy as sa
from service_harness import ServiceEnv  # bench/service_harness.py, beside this script

from api_client import AsyncInferqClient, InferqClient
from inferq.settings import Settings, get_settings
from storage.db import build_engine
from storage.records import TERMINAL_STATUSES
from storage.repository import Repository
from worker.engine.null import NullEngine
from worker.service.app import WorkerService

POLL_S = 0.1  # the old InferqClient.wait's default


class Gated(NullEngine):
    """The null engine, holding every sequence until `gate` is set; then finishing them all
    in one step (`per_step` 0), or `per_step` of them every `step_s` (as an engine's jobs end
    over its steps)."""

    def __init__(self, per_step: int = 0, step_s: float = 0.02) -> None:
        super().__init__("null", max_num_seqs=256)  # holds 256 x 4 = 1,024 jobs
        self.gate = threading.Event()
        self.per_step, self.step_s = per_step, step_s

    def step(self):
        if not self.gate.is_set():
            time.sleep(0.005)
            return []
        if not self.per_step:
            return super().step()
        time.sleep(self.step_s)
        queued = list(self._queued.items())
        self._queued = dict(queued[: self.per_step])
        done = super().step()
        self._queued = dict(queued[self.per_step :]) | self._queued
        return done


class TimedRepository(Repository):
    """The worker's repository, noting when each result's transaction committed."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.committed: dict[uuid.UUID, float] = {}

    def store_outcomes(self, ended, *args, **kwargs):
        new = super().store_outcomes(ended, *args, **kwargs)
        now = time.time()
        for e in ended:
            self.committed.setdefault(e.job_id, now)
        return new


def poll_wait(repo: Repository, job_id: uuid.UUID, tenant: str, timeout: float) -> None:
    """The old `InferqClient.wait`: read the job every 100 ms until it has ended."""
    deadline = time.monotonic() + timeout
    while True:
        view = repo.get_many([job_id], tenant).get(job_id)
        if view is not None and view.status in TERMINAL_STATUSES:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(job_id)
        time.sleep(POLL_S)


def transactions(admin: sa.Engine, db: str) -> int:
    with admin.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        return conn.scalar(
            sa.text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
            {"d": db},
        )


class Waiters:
    """N waiters, one job each: a thread per waiter (`poll`, `notify`), or one thread whose
    event loop runs a task per waiter (`async`); `woke` has when each wait returned."""

    def __init__(self, mode: str, settings: Settings, db_url: str, ids: list[uuid.UUID]):
        self.mode, self.ids = mode, ids
        self.client = InferqClient(settings, tenant="bench")
        self.reader = Repository(build_engine(db_url))  # the polling producers' own pool
        self.woke: dict[uuid.UUID, float] = {}
        self.errors: list[BaseException] = []
        self.started = threading.Barrier(2 if mode == "async" else len(ids) + 1)
        if mode == "async":
            self.threads = [_async_waiters(settings, ids, self.started, self.woke, self.errors)]
        else:
            wait = self._wait
            self.threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in ids]

    def _wait(self, job_id: uuid.UUID) -> None:
        self.started.wait()
        try:
            if self.mode == "poll":
                poll_wait(self.reader, job_id, "bench", timeout=300)
            else:
                self.client.wait(job_id, timeout=300)
            self.woke[job_id] = time.time()
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> None:
        for t in self.threads:
            t.start()
        self.started.wait()
        time.sleep(1.0)  # every waiter is waiting (subscribed, or polling)

    def join(self) -> dict[uuid.UUID, float]:
        for t in self.threads:
            t.join(300)
        self.client.close()
        self.reader.engine.dispose()
        if self.errors:
            raise self.errors[0]
        return self.woke


def _child() -> None:
    """The waiters in a process of their own (`--apart`): the job ids and URLs come as one
    JSON line on stdin; "ready" once every waiter waits; then the wake-ups as one JSON line."""
    spec = json.loads(sys.stdin.readline())
    settings = get_settings(broker_url=spec["broker"], database_url=spec["db"], queue="bench")
    waiters = Waiters(spec["mode"], settings, spec["db"], [uuid.UUID(i) for i in spec["ids"]])
    waiters.start()
    print("ready", flush=True)
    print(json.dumps({str(k): v for k, v in waiters.join().items()}), flush=True)


def run(mode: str, waiters: int, hold_s: float, apart: bool, per_step: int = 0) -> dict:
    with ServiceEnv(f"results_{mode}_{waiters}", model="null", heartbeat_s=5.0) as env:
        worker_repo = TimedRepository(env.url)
        gated = Gated(per_step)
        client = InferqClient(env.settings, tenant="bench")
        with WorkerService(env.settings, engines={"null": gated}, repo=worker_repo) as worker:
            published = _timed_writes(worker)
            ids = client.submit_many(
                {"prompt": f"job {n}", "params": {"max_tokens": 1}} for n in range(waiters)
            )
            deadline = time.monotonic() + 120
            while len(worker.ledger) < waiters:  # every job claimed and held
                assert time.monotonic() < deadline, f"{len(worker.ledger)} of {waiters} held"
                time.sleep(0.05)
            if apart:
                child = subprocess.Popen(
                    [sys.executable, __file__, "--child"], stdin=PIPE, stdout=PIPE, text=True
                )
                spec = {"mode": mode, "broker": env.settings.broker_url, "db": env.url}
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write(json.dumps({**spec, "ids": [str(i) for i in ids]}) + "\n")
                child.stdin.flush()
                assert child.stdout.readline().strip() == "ready", "the waiters' process failed"
            else:
                local = Waiters(mode, env.settings, env.url, ids)
                local.start()
            before, t0 = transactions(env.admin, env.db), time.monotonic()
            time.sleep(hold_s)
            held_tps = (transactions(env.admin, env.db) - before) / (time.monotonic() - t0)
            gated.gate.set()
            if apart:
                line = child.stdout.readline()
                assert child.wait(60) == 0 and line, "the waiters' process failed"
                woke = {uuid.UUID(k): v for k, v in json.loads(line).items()}
            else:
                woke = local.join()
        client.close()
    lat_ms = sorted((woke[i] - worker_repo.committed[i]) * 1000 for i in ids)
    pub_ms = [(published[i] - worker_repo.committed[i]) * 1000 for i in ids]
    q = statistics.quantiles(lat_ms, n=20) if len(lat_ms) > 1 else lat_ms * 19
    return {
        "mode": mode,
        "where": "apart" if apart else "with worker",
        "release": f"{per_step} per {gated.step_s * 1000:.0f} ms" if per_step else "all at once",
        "waiters": waiters,
        "p50": statistics.median(lat_ms),
        "p95": q[18],
        "max": lat_ms[-1],
        "pub": statistics.median(pub_ms),
        "tps": held_tps,
    }


def _async_waiters(
    settings: Settings,
    ids: list[uuid.UUID],
    started: threading.Barrier,
    woke: dict[uuid.UUID, float],
    errors: list[BaseException],
) -> threading.Thread:
    """A thread whose event loop runs one `AsyncInferqClient.wait` task per job."""

    async def wait(client: AsyncInferqClient, job_id: uuid.UUID) -> None:
        try:
            await client.wait(job_id, timeout=300)
            woke[job_id] = time.time()
        except BaseException as exc:
            errors.append(exc)

    async def main() -> None:
        client = AsyncInferqClient(settings, tenant="bench")
        tasks = [asyncio.create_task(wait(client, i)) for i in ids]
        await asyncio.to_thread(started.wait)
        await asyncio.gather(*tasks)
        await client.aclose()

    return threading.Thread(target=asyncio.run, args=(main(),), daemon=True)


def wake_floor(waiters: int) -> tuple[float, float]:
    """p50 ms from setting N events to their waiters running, with nothing else to do: N
    threads blocked on `threading.Event`s, and N tasks of one event loop on `asyncio.Event`s
    (the least the `notify` and `async` modes can cost in one process)."""
    events = [threading.Event() for _ in range(waiters)]
    woke: list[float] = []
    threads = [
        threading.Thread(target=lambda e=e: (e.wait(), woke.append(time.perf_counter())))
        for e in events
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    for e in events:
        e.set()
    for t in threads:
        t.join()
    threaded = statistics.median(woke) - t0

    async def tasks() -> float:
        flags = [asyncio.Event() for _ in range(waiters)]
        done: list[float] = []

        async def one(flag: asyncio.Event) -> None:
            await flag.wait()
            done.append(time.perf_counter())

        running = [asyncio.create_task(one(f)) for f in flags]
        await asyncio.sleep(0.1)
        start = time.perf_counter()
        for f in flags:
            f.set()
        await asyncio.gather(*running)
        return statistics.median(done) - start

    return threaded * 1000, asyncio.run(tasks()) * 1000


def _timed_writes(worker: WorkerService) -> dict[uuid.UUID, float]:
    """When the worker's last write of each job's state returned (its ended state, here)."""
    published: dict[uuid.UUID, float] = {}
    assert worker.publisher is not None
    write = worker.publisher.write

    def timed(job_ids: list[uuid.UUID]) -> None:
        write(job_ids)
        now = time.time()
        published.update(dict.fromkeys(job_ids, now))

    worker.publisher.write = timed  # type: ignore[method-assign]
    return published


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiters", default="1,100,1000")
    parser.add_argument("--modes", default="poll,notify,async")
    parser.add_argument("--hold-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="the waiters in the worker's process (before 2026-12-06: the published figures "
        "up to then), not in a process of their own",
    )
    parser.add_argument(
        "--release",
        default="all",
        help="how the held jobs end: 'all' in one step (a burst), or N: N every 20 ms (as an "
        "engine's jobs end over its steps); a list runs each",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child()
    rows = []
    for waiters in map(int, args.waiters.split(",")):
        threaded, tasks = wake_floor(waiters)
        print(
            f"floor {waiters:>5} waiters: events set to waiters running p50 {threaded:.2f} ms "
            f"(threads), {tasks:.2f} ms (asyncio tasks)",
            flush=True,
        )
        for mode, release in itertools.product(args.modes.split(","), args.release.split(",")):
            per_step = 0 if release == "all" else int(release)
            row = run(mode, waiters, args.hold_s, not args.with_worker, per_step)
            rows.append(row)
            print(
                f"{mode:>6} {waiters:>5} waiters, {row['release']}: wake-up after commit p50 "
                f"{row['p50']:.1f} ms, "
                f"p95 {row['p95']:.1f} ms, max {row['max']:.1f} ms (published p50 "
                f"{row['pub']:.1f} ms); PostgreSQL {row['tps']:.1f} transactions/s while "
                "waiting",
                flush=True,
            )
    lines = [
        "| waiters | mode | waiters' process | jobs end | wake-up after commit p50 ms | p95 ms "
        "| max ms | published after commit p50 ms | PostgreSQL transactions/s while waiting |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['waiters']} | {r['mode']} | {r['where']} | {r['release']} | {r['p50']:.1f} "
            f"| {r['p95']:.1f} "
            f"| {r['max']:.1f} | {r['pub']:.1f} | {r['tps']:.1f} |"
            for r in rows
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
