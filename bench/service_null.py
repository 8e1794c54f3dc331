"""Null-engine service benchmark and soak: how many jobs/s the service sustains through
Redis and PostgreSQL when the engine costs nothing, the worker's CPU per job, its memory over
the run, and (with --outage-s) what a PostgreSQL outage in the middle costs.

Usage: .venv/bin/python bench/service_null.py [--jobs 10000] [--outage-s 0] [--ttl-s 0]
[--out bench/out]
Needs the local Redis and PostgreSQL (`make services`; --outage-s stops and restarts the
cluster, as root). The jobs are sent first, as raw `send_task` messages (no job rows: the
worker writes them), then a worker process starts (`inferq worker`, INFERQ_ENGINE=null) and
drains the queue. Timed from the first job the worker claims to the last result; worker CPU
and RSS from /proc (RSS at the first result, after 10 % of the jobs = warm-up, and at the
end). With --ttl-s every job carries that deadline (30 days = 2592000: finished jobs must not
stay in the engine loop's deadline heap until it passes). With --outage-s,
PostgreSQL is stopped once 20 % of the jobs are done, for that long: the table adds the
worker's CPU share during the outage and the log lines it wrote meanwhile.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from service_harness import (  # bench/service_harness.py, beside this script
    ServiceEnv,
    postgres,
    proc_cpu_s,
    proc_rss_mb,
    start_worker,
    stop_worker,
)

from api_client.wire import TASK_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--outage-s", type=float, default=0.0)
    parser.add_argument("--ttl-s", type=float, default=0.0, help="each job's ttl_s (0: none)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ServiceEnv("null") as env:
        ids = [uuid.uuid4() for _ in range(args.jobs)]
        t0 = time.perf_counter()
        with env.producer.connection_for_write() as conn:
            for job_id in ids:
                job = {"job_id": str(job_id), "prompt": "Say hi.", "params": {"max_tokens": 4}}
                if args.ttl_s:
                    job["ttl_s"] = args.ttl_s
                env.producer.send_task(
                    TASK_NAME, kwargs=job, queue=env.settings.queue, connection=conn
                )
        print(f"enqueued {args.jobs} jobs in {time.perf_counter() - t0:.1f}s")
        log = args.out / "null_worker.log"
        worker = start_worker(env, {"INFERQ_ENGINE": "null"}, log)
        try:
            run = _drain(env, worker, args.jobs, args.outage_s, log)
        finally:
            stop_worker(worker)
        lost, dups = env.lost_and_duplicates(ids)
    wall, cpu = run["wall"], run["cpu"]
    growth = run["rss_end"] / run["rss_warm"] - 1
    lines = [
        "| jobs | ttl s | wall s | jobs/s | worker CPU ms/job | RSS MB first / warm / end "
        "(growth) | lost | duplicates | outage s | CPU during outage | log lines during outage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.jobs} | {args.ttl_s:.0f} | {wall:.1f} | {args.jobs / wall:.0f} | "
        f"{cpu / args.jobs * 1000:.2f} | {run['rss_first']:.0f} / {run['rss_warm']:.0f} / "
        f"{run['rss_end']:.0f} ({growth:+.1%}) | {lost} | {dups} | "
        f"{args.outage_s:.0f} | {run.get('outage_cpu', 0):.1%} | {run.get('outage_lines', 0)} |",
    ]
    print("\n".join(lines))
    (args.out / "service_null.md").write_text("\n".join(lines) + "\n")


def _drain(env, worker, jobs: int, outage_s: float, log: Path) -> dict[str, float]:
    """Watch the worker drain the queue; stop PostgreSQL mid-run when asked."""
    run: dict[str, float] = {}
    cpu0 = t_first = None
    while True:
        done = _count(env)
        if cpu0 is None and done > 0:
            cpu0, t_first = proc_cpu_s(worker.pid), time.perf_counter()
            run["rss_first"] = proc_rss_mb(worker.pid)
        if "rss_warm" not in run and done >= jobs // 10:
            run["rss_warm"] = proc_rss_mb(worker.pid)
        if outage_s and "outage_cpu" not in run and done >= jobs // 5:
            lines0, c0 = len(log.read_text().splitlines()), proc_cpu_s(worker.pid)
            postgres("stop")
            time.sleep(outage_s)
            run["outage_cpu"] = (proc_cpu_s(worker.pid) - c0) / outage_s
            run["outage_lines"] = len(log.read_text().splitlines()) - lines0
            postgres("start")
        if done >= jobs:
            break
        if worker.poll() is not None:
            raise SystemExit(f"worker exited with {worker.returncode}")
        time.sleep(0.05)
    run["wall"] = time.perf_counter() - t_first
    run["cpu"] = proc_cpu_s(worker.pid) - cpu0
    run["rss_end"] = proc_rss_mb(worker.pid)
    return run


def _count(env) -> int:
    """Results so far (0 while the database is restarting)."""
    try:
        return env.count_done()
    except sa.exc.OperationalError:
        time.sleep(0.5)
        return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
