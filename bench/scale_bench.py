"""Scale-out: N `inferq worker` processes on one Redis queue, round-robin vs prefix affinity.

Usage: .venv/bin/python bench/scale_bench.py [--workers 4] [--jobs 256] [--max-new 64]
       [--dtype bfloat16] [--only bench/rr,skewed/affinity,...|none] [--kill] [--out bench/out]
Per configuration (workload x routing): a fresh PostgreSQL database and flushed Redis db
(bench/service_harness.py's ServiceEnv), N workers named w0..w<N-1> (INFERQ_AFFINITY=0: every
worker takes from the shared queue, whoever comes first; 1: prefix-affinity routing), all jobs
submitted at t=0 through `InferqClient` (tenant "bench"), then facts read from `job_metrics`.
Workers run with OMP/MKL_NUM_THREADS=1 and a small max_num_seqs / KV cache, so N of them fit on
a small machine; on 2 cores they share the CPU: this measures routing, not scaling.
Workloads (same seed, same user parts and max_tokens):
- bench: bench/engine_bench.py's build_workload (4 system prompts, uniform over jobs).
- skewed: the same jobs with their system prompts re-assigned (seed + 1): a random half of the
  jobs get system prompt 0 (the hot one), the other half one of prompts 1..3 uniformly.
- many: the same jobs, each system prompt opened by one of 8 "Desk d of 8." lines at random:
  32 prefixes of about 8 jobs each, where spreading a prefix over workers costs most.
Columns: jobs per worker (w0..), max/min of those; prefix hit = cached prompt tokens / shareable
system-prompt tokens (service_bench's definition: all but one job's system block per prompt);
hit per worker = a worker's cached prompt tokens / the system-block tokens of its jobs (min -
max over workers with jobs); cold prefixes = (worker, system prompt) pairs that occurred, each
one a first miss (ideal: the number of system prompts); cached/prompt = cached prompt tokens /
all prompt tokens; latency = job_metrics.total_s (enqueue -> finished) and
TTFT = ttft_s, p50 / p95; wall = first enqueue (jobs.queued_at) to last finished_at; out tok/s
= completion tokens / wall.
--kill: affinity on, the bench workload, INFERQ_WORKER_DEAD_AFTER_S=10 and INFERQ_HEARTBEAT_S=2
on every worker. Once a third of the jobs are done, SIGKILL the worker with the most `running`
jobs (jobs a worker has claimed, waiting room included), then measure: seconds from the kill
until every job that was running on it is `done` (target <= 60 s), jobs done, lost (not done
at the end), duplicate results and the `jobs.attempts` distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from engine_bench import shareable_tokens  # bench/, beside this script
from scale_fleet import Fleet
from scale_workloads import WORKLOADS, Spec, build_specs
from service_harness import REDIS, ServiceEnv

from inferq.settings import FP_MODEL

ROUTINGS = {"rr": "0", "affinity": "1"}
CONFIGS = [f"{w}/{r}" for w in WORKLOADS for r in ROUTINGS]
# The kill run keeps the defaults: the affinity reaper hands a dead worker's messages back
# after INFERQ_AFFINITY_DEAD_AFTER_S (10 s); the PostgreSQL sweeper (60 s) is the backstop.
KILL_ENV: dict[str, str] = {}
FACTS = sa.text(
    "SELECT m.job_id, m.worker, m.status, m.prompt_tokens, m.cached_prompt_tokens,"
    " m.completion_tokens, m.total_s, m.ttft_s, m.finished_at, j.queued_at"
    " FROM job_metrics m JOIN jobs j ON j.id = m.job_id"
)


@dataclass
class Row:
    config: str
    jobs_per_worker: list[int]
    hit: float
    hit_worker: list[float | None]
    cold: int
    cached_share: float
    latency: tuple[float, float]
    ttft: tuple[float, float]
    out_tps: float
    wall_s: float
    done: int
    extra: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        lo, hi = min(self.jobs_per_worker), max(self.jobs_per_worker)
        hits = [h for h in self.hit_worker if h is not None]
        return [
            self.config,
            " ".join(map(str, self.jobs_per_worker)),
            f"{hi / lo:.2f}" if lo else "inf",
            f"{self.hit:.1%}",
            f"{min(hits):.1%} - {max(hits):.1%}" if hits else "-",
            str(self.cold),
            f"{self.cached_share:.1%}",
            "{:.1f} / {:.1f}".format(*self.latency),
            "{:.1f} / {:.1f}".format(*self.ttft),
            f"{self.out_tps:.1f}",
            f"{self.wall_s:.1f}",
        ]


HEADER = [
    "workload/routing",
    "jobs per worker",
    "max/min",
    "prefix hit",
    "hit per worker",
    "cold prefixes",
    "cached/prompt",
    "p50 / p95 latency s",
    "p50 / p95 TTFT s",
    "out tok/s",
    "wall s",
]


def worker_env(args: argparse.Namespace, routing: str, kill: bool = False) -> dict[str, str]:
    env = {
        "INFERQ_MODEL": FP_MODEL,
        "INFERQ_DTYPE": args.dtype,
        "INFERQ_ENGINE": "paged",
        "INFERQ_AFFINITY": ROUTINGS[routing],
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "INFERQ_MAX_NUM_SEQS": str(args.max_num_seqs),
        "INFERQ_KV_CACHE_TOKENS": str(args.kv_cache_tokens),
    }
    env.update(KILL_ENV if kill else {})
    env.update(kv.split("=", 1) for kv in args.env)
    return env


def submit(env: ServiceEnv, specs: list[Spec]) -> list[uuid.UUID]:
    client = env.client.for_tenant("bench")
    return client.submit_many(
        {"messages": s.messages, "model": FP_MODEL, "params": {"max_tokens": s.max_tokens}}
        for s in specs
    )


def pct(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=100)
    return q[49], q[94]


def collect(
    env: ServiceEnv,
    config: str,
    ids: list[uuid.UUID],
    specs: list[Spec],
    sys_lens: list[int],
    workers: int,
) -> Row:
    """The row for one configuration, from job_metrics (done jobs only)."""
    system = {i: s.system for i, s in zip(ids, specs, strict=True)}
    with env.db_engine.connect() as conn:
        facts = [r for r in conn.execute(FACTS).mappings() if r["status"] == "done"]
    names = [f"w{i}" for i in range(workers)]
    names += sorted({r["worker"] for r in facts} - set(names))
    per = {w: [r for r in facts if r["worker"] == w] for w in names}
    hit_worker: list[float | None] = []
    for rows in per.values():
        blocks = sum(sys_lens[system[r["job_id"]]] for r in rows)
        cached = sum(r["cached_prompt_tokens"] for r in rows)
        hit_worker.append(cached / blocks if blocks else None)
    cold = len({(r["worker"], system[r["job_id"]]) for r in facts})
    cached = sum(r["cached_prompt_tokens"] for r in facts)
    t0 = min(r["queued_at"] for r in facts)
    wall = (max(r["finished_at"] for r in facts) - t0).total_seconds()
    return Row(
        config,
        [len(rows) for rows in per.values()],
        cached / shareable_tokens(specs, sys_lens),
        hit_worker,
        cold,
        cached / max(1, sum(r["prompt_tokens"] for r in facts)),
        pct([r["total_s"] for r in facts]),
        pct([r["ttft_s"] for r in facts]),
        sum(r["completion_tokens"] for r in facts) / wall,
        wall,
        len(facts),
    )


def run_config(
    args: argparse.Namespace, config: str, specs: list[Spec], sys_lens: list[int]
) -> Row:
    workload, routing = config.split("/")
    print(f"== {config}: {args.workers} workers, {len(specs)} jobs", flush=True)
    with (
        ServiceEnv(f"scale_{workload}_{routing}") as env,
        Fleet(env, args.workers, worker_env(args, routing), args.out, f"{workload}_{routing}"),
    ):
        ids = submit(env, specs)
        env.client.for_tenant("bench").wait_many(ids, timeout=args.timeout, poll=2.0)
        return collect(env, config, ids, specs, sys_lens, args.workers)


def scalar_rows(env: ServiceEnv, sql: str, **params: object) -> list[tuple]:
    with env.db_engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params)]


def run_kill(args: argparse.Namespace, specs: list[Spec], sys_lens: list[int]) -> Row:
    """Affinity on; SIGKILL the busiest worker a third of the way; time the recovery."""
    print(f"== recovery: {args.workers} workers, {len(specs)} jobs, kill at 1/3", flush=True)
    n = len(specs)
    with (
        ServiceEnv("scale_kill") as env,
        Fleet(env, args.workers, worker_env(args, "affinity", kill=True), args.out, "kill") as fl,
    ):
        ids = submit(env, specs)
        deadline = time.monotonic() + args.timeout
        while scalar_rows(env, "SELECT count(*) FROM jobs WHERE status='done'")[0][0] < n / 3:
            if time.monotonic() > deadline:
                raise TimeoutError("a third of the jobs not done")
            time.sleep(0.5)
        running = scalar_rows(
            env,
            "SELECT worker, count(*) FROM jobs WHERE status='running' "
            "GROUP BY worker ORDER BY count(*) DESC, worker",
        )
        if not running:
            raise SystemExit("no worker holds running jobs a third of the way: nothing to kill")
        victim = running[0][0]
        fl.procs[victim].send_signal(signal.SIGKILL)
        t_kill, killed_at = time.monotonic(), datetime.now(UTC)
        fl.procs[victim].wait()  # dead before its jobs are read: it writes nothing more
        held = [
            r[0]
            for r in scalar_rows(
                env, "SELECT id FROM jobs WHERE status='running' AND worker=:w", w=victim
            )
        ]
        done_at_kill = scalar_rows(env, "SELECT count(*) FROM jobs WHERE status='done'")[0][0]
        print(
            f"killed {victim} at {done_at_kill}/{n} done; running then: {dict(running)}; "
            f"{len(held)} running on it",
            flush=True,
        )
        recovery_s = None
        while time.monotonic() < deadline:
            left = scalar_rows(
                env, "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status <> 'done'", ids=held
            )[0][0]
            if left == 0 and recovery_s is None:
                recovery_s = time.monotonic() - t_kill
                print(f"all {len(held)} recovered after {recovery_s:.1f}s", flush=True)
            ended = scalar_rows(
                env,
                "SELECT count(*) FROM jobs WHERE status IN ('done','failed','cancelled','expired')",
            )[0][0]
            if ended == n and recovery_s is not None:
                break
            time.sleep(1.0)
        row = collect(env, "bench/affinity+kill", ids, specs, sys_lens, args.workers)
        requeued = scalar_rows(
            env,
            "SELECT min(requeued_at), max(requeued_at) FROM jobs WHERE id = ANY(:ids)",
            ids=held,
        )[0]
        rerun = dict(
            scalar_rows(
                env,
                "SELECT worker, count(*) FROM job_metrics WHERE job_id = ANY(:ids) GROUP BY worker",
                ids=held,
            )
        )
        lost, dupes = env.lost_and_duplicates(ids)
        multi = scalar_rows(
            env, "SELECT job_id, count(*) FROM results GROUP BY job_id HAVING count(*) > 1"
        )
        attempts = dict(
            scalar_rows(
                env, "SELECT attempts, count(*) FROM jobs GROUP BY attempts ORDER BY attempts"
            )
        )
        unacked = redis.Redis.from_url(REDIS).hlen("unacked")
        row.extra = {
            "victim": victim,
            "done_at_kill": done_at_kill,
            "running_at_kill": dict(running),
            "held": len(held),
            "recovery_s": recovery_s,
            "done": n - lost,
            "lost": lost,
            "duplicate_results": len(multi) + dupes,
            "attempts": attempts,
            "redis_unacked_at_end": unacked,
            "rerun_on": rerun,
            "requeued_after_s": [(t - killed_at).total_seconds() if t else None for t in requeued],
        }
        return row


def recovery_line(row: Row) -> str:
    x = row.extra
    took = f"{x['recovery_s']:.1f} s" if x["recovery_s"] is not None else "NOT within timeout"
    ok = "ok" if x["recovery_s"] is not None and x["recovery_s"] <= 60 else "MISSED"
    sent = " - ".join("-" if t is None else f"{t:.1f}" for t in x["requeued_after_s"])
    return (
        f"Recovery ({row.config}): SIGKILL {x['victim']} at {x['done_at_kill']} done, holding "
        f"{x['held']} running jobs (running per worker: {x['running_at_kill']}); all of them done "
        f"{took} after the kill (target <= 60 s: {ok}); sent again by the PostgreSQL sweeper "
        f"{sent} s after the kill (-: never, the affinity reaper was first), run again on "
        f"{x['rerun_on']}; done {x['done']}, lost {x['lost']}, "
        f"duplicate results {x['duplicate_results']}, jobs.attempts {x['attempts']}, Redis "
        f"unacked messages left {x['redis_unacked_at_end']}."
    )


def write(args: argparse.Namespace, rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    lines += ["", *(recovery_line(r) for r in rows if r.extra)]
    text = (
        f"{args.workers} workers, {args.jobs} jobs, max_new {args.max_new}, {args.dtype}, "
        f"max_num_seqs {args.max_num_seqs}, KV {args.kv_cache_tokens} tokens"
        f"{', worker env ' + ' '.join(args.env) if args.env else ''}\n\n" + "\n".join(lines) + "\n"
    )
    (args.out / "scale_bench.md").write_text(text)
    params = {k: str(v) for k, v in vars(args).items()}
    data = {"args": params, "rows": [asdict(r) for r in rows]}
    (args.out / "scale_bench.json").write_text(json.dumps(data, indent=1, default=str))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--kv-cache-tokens", type=int, default=16384)
    parser.add_argument(
        "--only", default=",".join(CONFIGS), help=f"comma-separated of {CONFIGS}, or none"
    )
    parser.add_argument("--kill", action="store_true", help="add the recovery run")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more worker environment variable (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    only = [] if args.only == "none" else [c.strip() for c in args.only.split(",")]
    if unknown := set(only) - set(CONFIGS):
        parser.error(f"unknown --only {sorted(unknown)}; choose from {CONFIGS} or none")
    args.out.mkdir(parents=True, exist_ok=True)
    workloads, sys_lens = build_specs(args.jobs, args.seed, args.max_new)
    for name, specs in workloads.items():
        counts = Counter(s.system for s in specs)
        print(
            f"{name}: jobs per system prompt {dict(sorted(counts.items()))}, "
            f"system block tokens {sys_lens}",
            flush=True,
        )
    rows: list[Row] = []
    for config in (c for c in CONFIGS if c in only):
        rows.append(run_config(args, config, workloads[config.split("/")[0]], sys_lens))
        print("| " + " | ".join(rows[-1].cells()) + " |", flush=True)
        write(args, rows)
    if args.kill:
        rows.append(run_kill(args, workloads["bench"], sys_lens))
        print("| " + " | ".join(rows[-1].cells()) + " |", flush=True)
    print(write(args, rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    main()
