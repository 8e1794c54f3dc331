"""Null-engine service benchmark: how many jobs/s the service sustains through Redis and
PostgreSQL when the engine costs nothing, and the worker's CPU per job.

Usage: .venv/bin/python bench/service_null.py [--jobs 10000] [--out bench/out]
Needs the local Redis and PostgreSQL (`make services`). The jobs are sent first, as raw
`send_task` messages (no job rows: the worker writes them), then a worker process starts
(`inferq worker`, INFERQ_ENGINE=null) and drains the queue. Timed from the first job the
worker claims to the last result; worker CPU from /proc over the same span.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

from service_harness import (  # bench/service_harness.py, beside this script
    ServiceEnv,
    proc_cpu_s,
    start_worker,
    stop_worker,
)

from api_client.wire import TASK_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ServiceEnv("null") as env:
        ids = [uuid.uuid4() for _ in range(args.jobs)]
        t0 = time.perf_counter()
        with env.producer.connection_for_write() as conn:
            for job_id in ids:
                job = {"job_id": str(job_id), "prompt": "Say hi.", "params": {"max_tokens": 4}}
                env.producer.send_task(
                    TASK_NAME, kwargs=job, queue=env.settings.queue, connection=conn
                )
        print(f"enqueued {args.jobs} jobs in {time.perf_counter() - t0:.1f}s")
        worker = start_worker(env, {"INFERQ_ENGINE": "null"}, args.out / "null_worker.log")
        try:
            cpu0, t_first = None, None
            while True:
                done = env.count_done()
                if cpu0 is None and env.count_jobs() > 0:
                    cpu0, t_first = proc_cpu_s(worker.pid), time.perf_counter()
                if done >= args.jobs:
                    break
                if worker.poll() is not None:
                    raise SystemExit(f"worker exited with {worker.returncode}")
                time.sleep(0.05)
            wall, cpu = time.perf_counter() - t_first, proc_cpu_s(worker.pid) - cpu0
        finally:
            stop_worker(worker)
        lost, dups = env.lost_and_duplicates(ids)
    lines = [
        "| jobs | wall s | jobs/s | worker CPU s | worker CPU ms/job | lost | duplicates |",
        "|---|---|---|---|---|---|---|",
        f"| {args.jobs} | {wall:.1f} | {args.jobs / wall:.0f} | {cpu:.1f} | "
        f"{cpu / args.jobs * 1000:.2f} | {lost} | {dups} |",
    ]
    print("\n".join(lines))
    (args.out / "service_null.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
