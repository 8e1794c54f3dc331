"""Gateway enqueue benchmark: requests/s and the gateway's CPU per request on the path that
does not wait (`POST /v1/chat/completions` with `Prefer: respond-async`: validate, enqueue,
answer 202), gateway processes of one commit alternated in one run so that drift in the
machine's load falls on each: `push` (now: the job pushed as Celery's own message in one
pipelined Redis round trip, uvicorn on httptools and uvloop), `push-h11` (the same with
httptools and uvloop unimportable: uvicorn's h11 and asyncio, as before they were installed),
`celery` (the job sent by Celery's producer in a thread, as before commit 9871e74).

Usage: .venv/bin/python bench/gateway_enqueue_bench.py [--requests 5000] [--concurrency 64]
[--rounds 3] [--modes push-h11,push] [--out bench/out]
Needs the local Redis (INFERQ_BENCH_REDIS) and PostgreSQL. A null-engine worker starts so that
the model is live, then is stopped (SIGSTOP) while the gateway is measured, so that the
gateway, Redis and the load (httpx, asyncio, this process) share the cores, not the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis
from gateway_bench import _port, _wait_ready  # beside this script
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
sys.exit(main(["serve", "--port", sys.argv[2], "--loglevel", "WARNING"]))
"""


def _serve(env: ServiceEnv, mode: str, port: int, log: Path) -> subprocess.Popen:
    environ = {
        **os.environ,
        "INFERQ_BROKER_URL": env.settings.broker_url or "",
        "INFERQ_DATABASE_URL": env.url,
        "INFERQ_QUEUE": env.settings.queue,
        "INFERQ_WORKER_DEAD_AFTER_S": "86400",  # the stopped worker still serves "null"
    }
    cmd = [sys.executable, "-c", SERVE, mode, str(port)]
    return subprocess.Popen(cmd, env=environ, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def _load(base: str, key: str, model: str, n: int, concurrency: int, pid: int) -> dict:
    request = {"model": model, **CHAT}
    headers = {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0  # connections the server dropped (counted, then the request is sent again)
    left = iter(range(n))
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as http:

        async def lane() -> None:
            nonlocal errors
            for _ in left:
                t0 = time.perf_counter()
                while True:
                    try:
                        answer = await http.post("/chat/completions", json=request)
                        break
                    except httpx.TransportError:
                        errors += 1
                assert answer.status_code == 202, answer.text
                latencies.append(time.perf_counter() - t0)

        cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, proc_cpu_s(pid) - cpu0
    latencies.sort()
    return {
        "req_s": n / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
        "cpu_ms": cpu / n * 1000,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="push-h11,push", help=f"of {', '.join(MODES)}")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
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
                for mode in modes:
                    port = _port()
                    base = f"http://127.0.0.1:{port}/v1"
                    gateway = _serve(env, mode, port, args.out / "enqueue_serve.log")
                    try:
                        _wait_ready(base, key)
                        os.kill(worker.pid, signal.SIGSTOP)
                        model, c = env.settings.model, args.concurrency
                        asyncio.run(_load(base, key, model, 200, c, gateway.pid))  # warm up
                        row = asyncio.run(_load(base, key, model, args.requests, c, gateway.pid))
                    finally:
                        stop_worker(gateway)
                        os.kill(worker.pid, signal.SIGCONT)
                    # in the lists, or taken by the stopped worker's blocking read (unacked)
                    lists = r.keys(f"{env.settings.queue}*")
                    queued = sum(r.llen(k) for k in lists) + r.hlen("unacked")
                    r.delete(*lists, "unacked", "unacked_index")
                    row.update(round=rnd + 1, mode=mode, queued=queued, load=os.getloadavg()[0])
                    rows.append(row)
                    print(row, flush=True)
        finally:
            stop_worker(worker)
    _write(args.out / "gateway_enqueue_bench.md", rows, args)


def _write(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        f"{args.requests} requests at concurrency {args.concurrency} per row, alternated",
        "",
        "| round | mode | req/s | p50 ms | p95 ms | gateway CPU ms/req | queued | resent | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['mode']} | {r['req_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['cpu_ms']:.2f} | {r['queued']} | {r['errors']} | "
            f"{r['load']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
