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
import statistics
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from service_harness import ServiceEnv  # bench/service_harness.py, beside this script

from api_client import AsyncInferqClient, InferqClient
from inferq.settings import Settings
from storage.db import build_engine
from storage.records import TERMINAL_STATUSES
from storage.repository import Repository
from worker.engine.null import NullEngine
from worker.service.app import WorkerService

POLL_S = 0.1  # the old InferqClient.wait's default


class Gated(NullEngine):
    """The null engine, holding every sequence until `gate` is set."""

    def __init__(self) -> None:
        super().__init__("null", max_num_seqs=256)  # holds 256 x 4 = 1,024 jobs
        self.gate = threading.Event()

    def step(self):
        if not self.gate.is_set():
            time.sleep(0.005)
            return []
        return super().step()


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


def run(mode: str, waiters: int, hold_s: float) -> dict:
    with ServiceEnv(f"results_{mode}_{waiters}", model="null", heartbeat_s=5.0) as env:
        worker_repo = TimedRepository(env.url)
        gated = Gated()
        client = InferqClient(env.settings, tenant="bench")
        reader = Repository(build_engine(env.url))  # the polling producers' own pool
        woke: dict[uuid.UUID, float] = {}
        errors: list[BaseException] = []
        with WorkerService(env.settings, engines={"null": gated}, repo=worker_repo) as worker:
            published = _timed_writes(worker)
            ids = client.submit_many(
                {"prompt": f"job {n}", "params": {"max_tokens": 1}} for n in range(waiters)
            )
            deadline = time.monotonic() + 120
            while len(worker.ledger) < waiters:  # every job claimed and held
                assert time.monotonic() < deadline, f"{len(worker.ledger)} of {waiters} held"
                time.sleep(0.05)
            started = threading.Barrier(2 if mode == "async" else waiters + 1)

            def wait(job_id: uuid.UUID) -> None:
                started.wait()
                try:
                    if mode == "poll":
                        poll_wait(reader, job_id, "bench", timeout=300)
                    else:
                        client.wait(job_id, timeout=300)
                    woke[job_id] = time.time()
                except BaseException as exc:
                    errors.append(exc)

            if mode == "async":
                threads = [_async_waiters(env.settings, ids, started, woke, errors)]
            else:
                threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in ids]

            for t in threads:
                t.start()
            started.wait()
            time.sleep(1.0)  # every waiter is waiting (subscribed, or polling)
            before, t0 = transactions(env.admin, env.db), time.monotonic()
            time.sleep(hold_s)
            held_tps = (transactions(env.admin, env.db) - before) / (time.monotonic() - t0)
            gated.gate.set()
            for t in threads:
                t.join(300)
        client.close()
        reader.engine.dispose()
    if errors:
        raise errors[0]
    lat_ms = sorted((woke[i] - worker_repo.committed[i]) * 1000 for i in ids)
    pub_ms = [(published[i] - worker_repo.committed[i]) * 1000 for i in ids]
    q = statistics.quantiles(lat_ms, n=20) if len(lat_ms) > 1 else lat_ms * 19
    return {
        "mode": mode,
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
    args = parser.parse_args()
    rows = []
    for waiters in map(int, args.waiters.split(",")):
        threaded, tasks = wake_floor(waiters)
        print(
            f"floor {waiters:>5} waiters: events set to waiters running p50 {threaded:.2f} ms "
            f"(threads), {tasks:.2f} ms (asyncio tasks)",
            flush=True,
        )
        for mode in args.modes.split(","):
            row = run(mode, waiters, args.hold_s)
            rows.append(row)
            print(
                f"{mode:>6} {waiters:>5} waiters: wake-up after commit p50 {row['p50']:.1f} ms, "
                f"p95 {row['p95']:.1f} ms, max {row['max']:.1f} ms (published p50 "
                f"{row['pub']:.1f} ms); PostgreSQL {row['tps']:.1f} transactions/s while "
                "waiting",
                flush=True,
            )
    lines = [
        "| waiters | mode | wake-up after commit p50 ms | p95 ms | max ms | published after "
        "commit p50 ms | PostgreSQL transactions/s while waiting |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['waiters']} | {r['mode']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['max']:.1f} "
            f"| {r['pub']:.1f} | {r['tps']:.1f} |"
            for r in rows
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
