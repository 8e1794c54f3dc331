"""Gateway enqueue benchmark: requests/s and the gateway's CPU per request on the path that
does not wait (`POST /v1/chat/completions` with `Prefer: respond-async`: validate, enqueue,
answer 202), gateway processes of one commit alternated in one run so that drift in the
machine's load falls on each: `push` (now: the job pushed as Celery's own message in one
pipelined Redis round trip, uvicorn on httptools and uvloop), `push-h11` (the same with
httptools and uvloop unimportable: uvicorn's h11 and asyncio, as before they were installed),
`celery` (the job sent by Celery's producer in a thread, as before commit 9871e74).

`--processes 1,2` runs each mode with that many gateway processes (`inferq serve --workers N`).

Usage: .venv/bin/python bench/gateway_enqueue_bench.py [--requests 5000] [--concurrency 64]
[--rounds 3] [--modes push-h11,push] [--processes 1] [--out bench/out]
Needs the local Redis (INFERQ_BENCH_REDIS) and PostgreSQL. A null-engine worker starts so that
the model is live, then is stopped (SIGSTOP) while the gateway is measured, so that the
gateway, Redis and the load share the cores, not the worker. The load comes from
`http_load.py` in a process of its own (keep-alive connections, prebuilt requests: tens of
microseconds a request, where httpx took about a millisecond of the same two cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis
from gateway_bench import _children, _port, _wait_ready  # beside this script
from http_load import load_in_process
from service_harness import ServiceEnv, proc_cpu_s, start_worker, stop_worker

from storage.api_keys import ApiKeys

CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
# `inferq serve`, with `celery`: AsyncInferqClient.send as it was before commit 9871e74
# (Celery's producer in a thread, Celery's own kwargsrepr); with `push-h11`: without httptools
# and uvloop (`inferq serve` falls back to h11 and asyncio as if they were not installed)
MODES = ("celery", "push", "push-h11")
SERVE = """
import asyncio, sys
if sys.argv[1] == "push-h11":
    sys.modules["httptools"] = sys.modules["uvloop"] = None
import api_client.wire
from api_client.aio import AsyncInferqClient
async def send(self, msg):
    return await asyncio.to_thread(self.enqueue, msg)
if sys.argv[1] == "celery":
    AsyncInferqClient.send = send
    api_client.wire.kwargs_repr = lambda message: None
from inferq.cli import main
sys.exit(main(["serve", "--port", sys.argv[2], "--workers", sys.argv[3], "--loglevel", "WARNING"]))
"""


def _serve(env: ServiceEnv, mode: str, port: int, procs: int, log: Path) -> subprocess.Popen:
    environ = {
        **os.environ,
        "INFERQ_BROKER_URL": env.settings.broker_url or "",
        "INFERQ_DATABASE_URL": env.url,
        "INFERQ_QUEUE": env.settings.queue,
        "INFERQ_WORKER_DEAD_AFTER_S": "86400",  # the stopped worker still serves "null"
    }
    cmd = [sys.executable, "-c", SERVE, mode, str(port), str(procs)]
    return subprocess.Popen(cmd, env=environ, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _load(port: int, key: str, model: str, n: int, concurrency: int, pids: list[int]) -> dict:
    """`n` requests from the lean load generator, its process apart; the gateway's CPU."""
    body = json.dumps({"model": model, **CHAT}).encode()
    headers = {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}
    cpu0 = sum(proc_cpu_s(pid) for pid in pids)
    row = load_in_process(port, "/v1/chat/completions", body, headers, n, concurrency)
    cpu = sum(proc_cpu_s(pid) for pid in pids) - cpu0
    assert row["statuses"] == {"202": n}, row["statuses"]
    return {**row, "cpu_ms": cpu / n * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="push-h11,push", help=f"of {', '.join(MODES)}")
    parser.add_argument("--processes", default="1", help="gateway processes (--workers), e.g. 1,2")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    processes = [int(n) for n in args.processes.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: of {', '.join(MODES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with ServiceEnv("gateway_enqueue") as env:
        key = ApiKeys(env.url).create("bench")[1]
        worker = start_worker(env, {"INFERQ_ENGINE": "null"}, args.out / "enqueue_worker.log")
        r = redis.Redis.from_url(env.settings.broker_url or "")
        try:
            for rnd in range(args.rounds):
                for mode, procs in itertools.product(modes, processes):
                    port = _port()
                    gateway = _serve(env, mode, port, procs, args.out / "enqueue_serve.log")
                    try:
                        _wait_ready(f"http://127.0.0.1:{port}/v1", key)
                        pids = [gateway.pid, *_children(gateway.pid)]
                        os.kill(worker.pid, signal.SIGSTOP)
                        model, c = env.settings.model, args.concurrency
                        _load(port, key, model, 200, c, pids)  # warm up
                        row = _load(port, key, model, args.requests, c, pids)
                    finally:
                        stop_worker(gateway)
                        os.kill(worker.pid, signal.SIGCONT)
                    # in the lists, or taken by the stopped worker's blocking read (unacked)
                    lists = r.keys(f"{env.settings.queue}*")
                    queued = sum(r.llen(k) for k in lists) + r.hlen("unacked")
                    r.delete(*lists, "unacked", "unacked_index")
                    row.update(round=rnd + 1, mode=mode, procs=procs, queued=queued)
                    row.update(load=os.getloadavg()[0])
                    rows.append(row)
                    print(row, flush=True)
        finally:
            stop_worker(worker)
    _write(args.out / "gateway_enqueue_bench.md", rows, args)


def _write(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        f"{args.requests} requests at concurrency {args.concurrency} per row, alternated",
        "",
        "| round | mode | processes | req/s | p50 ms | p95 ms | CPU ms/req | queued | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['mode']} | {r['procs']} | {r['req_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['cpu_ms']:.2f} | {r['queued']} | {r['load']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
