"""The service against the engine alone, on the engine benchmark's workload, in one run.

Usage: .venv/bin/python bench/service_bench.py [--jobs 256] [--dtypes float32,bfloat16]
       [--max-new 128] [--seed 0] [--out bench/out] [--keep-db] [--example-prices]
       [--streaming on|off|on,off|on,off,off,on] [--rounds 1]
Per dtype, two rows with the same default settings (`Settings()`: max_num_seqs, KV size,
prefix cache, ...) and the same seeded jobs (bench/engine_bench.py's build_workload):
- engine alone: the engine the worker builds (`load_engine`), every job added at t=0 and run
  to completion in this process; times from the engine's own outputs. Run before the service
  rows and after each round of them (`--rounds`, default 1): the service's share is of the
  engine rows' mean, so the machine's drift over the minutes between them (±15 % on a 2-core
  VM) is averaged out instead of read as a gap; `--rounds 2` (engine, service, engine,
  service, engine) averages it better.
- service: an `inferq worker` process on the local Redis and a fresh PostgreSQL database;
  every job submitted at t=0 through `InferqClient` (row + Celery message each); times from
  the rows the worker wrote (queued_at, job_metrics), wall = first enqueue to last finish.
Latency and TTFT count from t=0 (enqueue); first admitted = the first job's admission after
t=0 (in the service: its intake's first take read, tokenized and claimed; the engine alone is
handed token ids); mean running = sum over jobs of (finished - admitted) / wall; prefix hit =
cached prompt tokens / shareable system-prompt tokens.
Per row, where the cores went (bench/cpu_split.py: each worker thread, torch's threads,
PostgreSQL, Redis, this process, the rest of the machine, idle) and how often a second the
engine's threads were preempted.
The null-engine figures (jobs/s, worker CPU per job) come from bench/service_null.py.
Streaming (`--streaming`, default on: the worker's default): one service row per setting
listed (INFERQ_STREAM), in that order; with it on, this process reads every job's stream
while the jobs run (`AsyncInferqClient.stream`, all at once, as producers would) and checks
that each job's joined deltas equal its stored text (the summary's "streamed = stored"; a
mismatch fails the run after the table is written); with both, the summary gives the
throughput with streaming on as a share of off (each the mean of its rows: `on,off,off,on`
cancels a steady drift of the machine over the rows, which one `on,off` pair reads as a gap).
This process freezes its startup heap (`gc.freeze`) before the rows: see `workload`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import cpu_split  # bench/, beside this script
from engine_bench import build_workload, shareable_tokens
from service_harness import ServiceEnv, start_worker, stop_worker
from transformers import AutoTokenizer

from api_client import AsyncInferqClient
from inferq.demo import seed_example_prices
from inferq.settings import FP_MODEL, get_settings
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.codec import TextCodec
from worker.prep.models import resolve_model
from worker.service.app import load_engine


@dataclass
class Row:
    name: str
    wall_s: float
    out_tokens: int
    latency: list[float]
    ttft: list[float]
    running_s: float  # sum of admitted -> finished over jobs
    first_admitted_s: float  # after t=0
    cached: int
    texts: dict[int, str]
    streamed_same: int | None = None  # jobs whose joined stream equals their stored text
    cpu: list[tuple[str, float, float]] = field(default_factory=list)  # bench/cpu_split.py
    preempted_per_s: float = 0.0  # the engine threads' (cpu_split.preempted_per_s)

    def cells(self, shareable: int) -> list[str]:
        q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]  # noqa: E731
        return [
            self.name,
            f"{self.out_tokens / self.wall_s:.1f}",
            f"{q(self.latency, 50):.1f} / {q(self.latency, 95):.1f}",
            f"{q(self.ttft, 50):.1f} / {q(self.ttft, 95):.1f}",
            f"{self.first_admitted_s:.2f}",
            f"{self.running_s / self.wall_s:.1f}",
            f"{self.cached / shareable:.1%}",
            f"{self.wall_s:.1f}",
        ]


def rate(row: Row) -> float:
    """Output tokens per second."""
    return row.out_tokens / row.wall_s


class RecordingCodec:
    """Encodes like the model's codec and remembers each prompt's chat messages."""

    def __init__(self, codec):
        self.codec, self.messages = codec, {}

    def encode(self, prompt, messages):
        ids = self.codec.encode(prompt, messages)
        self.messages[id(ids)] = messages
        return ids


def engine_row(name: str, dtype: str, jobs) -> Row:
    settings = get_settings(model=FP_MODEL, dtype=dtype)
    engine = load_engine(settings, FP_MODEL)
    reqs = [
        EngineRequest(
            seq_id=str(i),
            prompt_ids=j.prompt_ids,
            params=SamplingParams(max_tokens=j.max_tokens),
            tenant="bench",
        )
        for i, j in enumerate(jobs)
    ]
    before, t0 = cpu_split.snapshot(os.getpid(), "engine alone"), time.time()
    outs = run_to_completion(engine, reqs)
    wall = max(o.finished_at for o in outs) - t0
    after, took = cpu_split.snapshot(os.getpid(), "engine alone"), time.time() - t0
    row = Row(
        name,
        wall,
        sum(len(o.token_ids) for o in outs),
        [o.finished_at - t0 for o in outs],
        [o.first_token_at - t0 for o in outs],
        sum(o.finished_at - o.admitted_at for o in outs),
        min(o.admitted_at for o in outs) - t0,
        sum(o.cached_tokens for o in outs),
        {i: o.text for i, o in enumerate(outs)},
        cpu=cpu_split.split(before, after, took),
        preempted_per_s=cpu_split.preempted_per_s(before, after, took),
    )
    del engine
    gc.collect()
    return row


def _wait_ready(log: Path, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if '"worker.ready"' in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}: see {log}")
        time.sleep(0.5)
    raise SystemExit(f"worker not ready after {timeout}s: see {log}")


class StreamReaders:
    """Every job's stream read at once in a thread of its own (an asyncio loop, as a producer
    app would); `texts()` waits for them and gives each job's joined deltas."""

    def __init__(self, client: AsyncInferqClient, ids: list[uuid.UUID]) -> None:
        self.client, self.ids, self._texts = client, ids, {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-streams")
        self._thread.start()

    def _run(self) -> None:
        async def one(job_id: uuid.UUID) -> None:
            self._texts[job_id] = "".join([d async for d in self.client.stream(job_id, 3600)])

        async def main() -> None:
            try:
                await asyncio.gather(*(one(i) for i in self.ids))
            finally:
                await self.client.aclose()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc

    def texts(self) -> dict[uuid.UUID, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._texts


def service_row(
    name: str,
    dtype: str,
    jobs,
    messages,
    out: Path,
    keep: bool = False,
    prices: bool = False,
    stream: bool = True,
    checkout: Path | None = None,
    worker_env: dict[str, str] | None = None,
) -> Row:
    with ServiceEnv("svc", keep=keep) as env:
        if prices:  # the demo's example prices, so `inferq report` shows costs
            seed_example_prices(env.db_engine, FP_MODEL)
        log = out / f"service_worker_{dtype}{'' if stream else '_stream_off'}.log"
        extra = {"INFERQ_MODEL": FP_MODEL, "INFERQ_DTYPE": dtype, "INFERQ_ENGINE": "paged"}
        extra["INFERQ_STREAM"] = "1" if stream else "0"
        extra.update(worker_env or {})
        proc = start_worker(env, extra, log, loglevel="INFO", checkout=checkout)
        try:
            _wait_ready(log, proc)
            before, started = cpu_split.snapshot(proc.pid), time.monotonic()
            client = env.client.for_tenant("bench")
            ids = client.submit_many(
                {
                    "messages": messages[id(j.prompt_ids)],
                    "model": FP_MODEL,
                    "params": {"max_tokens": j.max_tokens},
                }
                for j in jobs
            )
            readers = (
                StreamReaders(AsyncInferqClient(env.settings, "bench"), ids) if stream else None
            )
            views = client.wait_many(ids, timeout=3600)  # on Redis: no database reads
            streamed = readers.texts() if readers is not None else None
            after, took = cpu_split.snapshot(proc.pid), time.monotonic() - started
        finally:
            stop_worker(proc)
        assert all(v.status == "done" for v in views), {v.status for v in views}
        t0 = min(v.queued_at for v in views)
        finished = [v.queued_at + timedelta(seconds=v.metrics.total_s) for v in views]
        wall = (max(finished) - t0).total_seconds()
        lag = [(v.queued_at - t0).total_seconds() for v in views]
        same = None if streamed is None else sum(streamed[v.id] == v.result.text for v in views)
        return Row(
            name,
            wall,
            sum(v.result.completion_tokens for v in views),
            [g + v.metrics.total_s for g, v in zip(lag, views, strict=True)],
            [g + v.metrics.ttft_s for g, v in zip(lag, views, strict=True)],
            sum(v.metrics.total_s - v.metrics.queue_wait_s for v in views),
            min(g + v.metrics.queue_wait_s for g, v in zip(lag, views, strict=True)),
            sum(v.result.cached_tokens for v in views),
            {i: v.result.text for i, v in enumerate(views)},
            same,
            cpu_split.split(before, after, took),
            cpu_split.preempted_per_s(before, after, took),
        )


def workload(n_jobs: int, seed: int, max_new: int) -> tuple[list, int, RecordingCodec]:
    """The engine benchmark's seeded jobs, their shareable system-prompt tokens and the codec
    that remembers each prompt's chat messages; then this process's heap is frozen.

    This process is the producer and the stream readers (a producer app holds no engine): its
    startup heap (torch, transformers, the workload) is frozen, so that the readers' garbage
    collections do not walk it: unfrozen, the second streaming row's readers took 0.3-0.4 CPU s
    more than the first's, the same work on a heap grown by the rows before."""
    path = resolve_model(get_settings(), FP_MODEL)
    codec = RecordingCodec(TextCodec.from_model_dir(path))
    tok = AutoTokenizer.from_pretrained(path)
    jobs, sys_lens = build_workload(tok, codec, n_jobs, seed, max_new)
    shareable = shareable_tokens(jobs, sys_lens)
    gc.freeze()
    return jobs, shareable, codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--keep-db", action="store_true", help="keep the service's database")
    parser.add_argument("--example-prices", action="store_true", help="bill at the demo's prices")
    parser.add_argument(
        "--streaming", default="on", help="a service row per setting: on, off, on,off,off,on ..."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="the service rows this often, an engine row after each",
    )
    args = parser.parse_args()
    modes = args.streaming.split(",")
    assert set(modes) <= {"on", "off"}, f"--streaming: a list of on and off, not {args.streaming}"
    args.out.mkdir(parents=True, exist_ok=True)
    jobs, shareable, codec = workload(args.jobs, args.seed, args.max_new)
    header = [
        "row",
        "out tok/s",
        "p50 / p95 latency s",
        "p50 / p95 TTFT s",
        "first admitted s",
        "mean running seqs",
        "prefix hit",
        "wall s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary, mismatched, rows = [], False, []
    for dtype in args.dtypes.split(","):
        tag = {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)

        def add(row: Row) -> Row:
            rows.append(row)
            lines.append("| " + " | ".join(row.cells(shareable)) + " |")
            print(lines[-1], flush=True)
            return row

        engines = [add(engine_row(f"engine alone {tag} (1)", dtype, jobs))]
        served: list[tuple[str, str, Row]] = []  # (mode, who in the summary, row)
        for r in range(args.rounds):
            for n, mode in enumerate(modes):
                who = tag + (f", streaming {mode}" if len(modes) > 1 else "")
                k = r * modes.count(mode) + modes[: n + 1].count(mode)
                who += f" ({k})" if args.rounds * modes.count(mode) > 1 else ""
                row = service_row(
                    f"service (Redis + PostgreSQL) {who}",
                    dtype,
                    jobs,
                    codec.messages,
                    args.out,
                    args.keep_db,
                    args.example_prices,
                    stream=mode == "on",
                )
                served.append((mode, who, add(row)))
            engines.append(add(engine_row(f"engine alone {tag} ({r + 2})", dtype, jobs)))
        engine_rate = statistics.mean(map(rate, engines))  # the machine's drift, averaged out
        first = engines[0]
        for _, who, row in served:
            same = sum(first.texts[i] == row.texts[i] for i in first.texts)
            line = (
                f"{who}: service / engine alone = {rate(row) / engine_rate:.1%} (engine: mean of"
                f" its {len(engines)} rows, {engine_rate:.1f} out tok/s); same text"
                f" {same}/{len(jobs)}"
            )
            if row.streamed_same is not None:
                line += f"; streamed = stored {row.streamed_same}/{len(jobs)}"
                mismatched |= row.streamed_same != len(jobs)
            summary.append(line)
        if len(served) > 1:
            share = statistics.mean(rate(r) for _, _, r in served) / engine_rate
            line = f"{tag}: service / engine alone = {share:.1%} (means of {len(served)} and"
            summary.append(line + f" {len(engines)} rows)")
        if {"on", "off"} <= set(modes):
            on, off = (
                statistics.mean(rate(r) for m, _, r in served if m == k) for k in ("on", "off")
            )
            line = f"{tag}: service throughput with streaming on / off = {on / off:.1%}"
            counts = [sum(m == k for m, _, _ in served) for k in ("on", "off")]
            line += f" (means of {counts[0]} and {counts[1]} rows)"
            summary.append(line)
    for row in rows:
        summary += ["", *cpu_split.table(row.cpu, f"where the cores went: {row.name}")]
        summary.append(f"(the engine's threads preempted {row.preempted_per_s:.0f} times a second)")
    text = "\n".join([*lines, "", *summary]) + "\n"
    print(text)
    (args.out / "service_bench.md").write_text(text)
    (args.out / "service_bench.json").write_text(json.dumps({"summary": summary}, indent=1))
    if mismatched:
        raise SystemExit("a job's streamed text differs from its stored text")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
