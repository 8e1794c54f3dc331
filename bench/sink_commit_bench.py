"""What one commit of the result sink costs: `Repository.store_outcomes` (the sink's whole
transaction: batch row, results, done statuses, facts, costs, webhook outbox, views read back)
for k finished jobs at a time, on a fresh PostgreSQL database.

Usage: .venv/bin/python bench/sink_commit_bench.py [--jobs-per-commit 1,2,8,32] [--commits 100]
Prints, per k, the CPU (this thread: Python, SQLAlchemy, psycopg) and the wall time of one
commit, the mean over `--commits` commits after 10 unmeasured ones. Run it against another
checkout's storage with `PYTHONPATH=<checkout>` to compare versions on the same machine.
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime, timedelta

from service_harness import ServiceEnv  # bench/, beside this script

from storage.db import make_engine
from storage.records import BatchRecord, EndedJob, NewJob
from storage.repository import Repository

WARMUP = 10


def ended(job: NewJob, now: datetime) -> EndedJob:
    """A finished job as the sink records it (128 tokens of text, a cached prompt prefix)."""
    return EndedJob(
        job_id=job.id,
        model=job.model,
        worker="bench-worker",
        device="cpu",
        finished_at=now,
        compute_s=0.5,
        text="word " * 128,
        finish_reason="length",
        enqueued_at=now - timedelta(seconds=3),
        admitted_at=now - timedelta(seconds=2),
        first_token_at=now - timedelta(seconds=1),
        prompt_tokens=300,
        cached_prompt_tokens=200,
        computed_prompt_tokens=100,
        completion_tokens=128,
    )


def per_commit(repo: Repository, k: int, commits: int) -> tuple[float, float]:
    """(CPU ms, wall ms) of one commit of k finished jobs."""
    jobs = [
        NewJob(id=uuid.uuid4(), tenant="bench", model="m", prompt="p")
        for _ in range((commits + WARMUP) * k)
    ]
    repo.claim(jobs, "bench-worker")
    now = datetime.now(UTC)
    cpu = wall = 0.0
    for i in range(commits + WARMUP):
        group = [ended(j, now) for j in jobs[i * k : (i + 1) * k]]
        batch = BatchRecord(uuid.uuid4(), "bench-worker", "m", k, 128 * k, now, stats={})
        c0, w0 = time.thread_time(), time.perf_counter()
        repo.store_outcomes(group, [batch], {}, [], views={})
        if i >= WARMUP:
            cpu += time.thread_time() - c0
            wall += time.perf_counter() - w0
    return 1000 * cpu / commits, 1000 * wall / commits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs-per-commit", default="1,2,8,32")
    parser.add_argument("--commits", type=int, default=100)
    args = parser.parse_args()
    print("| jobs per commit | CPU ms per commit | wall ms per commit |\n|---|---|---|")
    with ServiceEnv("sink") as env:
        repo = Repository(make_engine(env.url))
        for k in map(int, args.jobs_per_commit.split(",")):
            cpu, wall = per_commit(repo, k, args.commits)
            print(f"| {k} | {cpu:.2f} | {wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
