"""Gateway benchmark: requests/s and latency through `inferq serve` against going straight
to the queue with `AsyncInferqClient`, on the null engine (so the service's own cost is all
that is measured), and a batch file round trip (upload, run, download, custom_ids one to one).

Usage: .venv/bin/python bench/gateway_bench.py [--requests 2000] [--concurrency 1,64]
[--batch-lines 10000] [--workers 1] [--engine null|model] [--out bench/out]
Needs the local Redis and PostgreSQL. One worker process (INFERQ_ENGINE=null; with `--engine
model` the default model, for the batch: `--concurrency '' --engine model`) and one gateway
process (`inferq serve`, `--workers N` processes) start on a fresh database. The gateway's
throughput is measured with the lean load generator (`http_load.py`, a process of its own),
the direct path's with `AsyncInferqClient` here; latency in this process (asyncio), the
gateway's over `http_load.KeepAlive` connections (what an HTTP client adds is not the
gateway's), the direct path's through `AsyncInferqClient`. Latency is per request, send to
answer; "added" is the gateway's p50 minus the direct client's p50 at the same concurrency.
Everything shares the machine's cores: the worker, the gateway, Redis, PostgreSQL and the
load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from http_load import KeepAlive, load_in_process, request_bytes
from service_harness import (  # beside this script
    ServiceEnv,
    proc_cpu_s,
    start_worker,
    stop_worker,
)

from api_client import AsyncInferqClient
from storage.api_keys import ApiKeys

CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(env: ServiceEnv, port: int, workers: int, log: Path) -> subprocess.Popen:
    environ = {
        **os.environ,
        "INFERQ_BROKER_URL": env.settings.broker_url or "",
        "INFERQ_DATABASE_URL": env.url,
        "INFERQ_QUEUE": env.settings.queue,
    }
    cmd = [
        sys.executable,
        "-m",
        "inferq.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loglevel",
        "WARNING",
    ]
    return subprocess.Popen(cmd, env=environ, stdout=log.open("wb"), stderr=subprocess.STDOUT)


async def _load(n: int, concurrency: int, one) -> tuple[float, list[float]]:
    """`n` calls of `one()` with `concurrency` in flight: wall seconds, latencies."""
    latencies: list[float] = []
    left = iter(range(n))

    async def lane() -> None:
        for _ in left:
            t0 = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies


async def _measure(
    env: ServiceEnv, port: int, key: str, n: int, concurrency: int, pids: list[int]
) -> dict:
    """Throughput of each path alone (`n` requests each; the gateway's from the lean load
    generator in a process of its own), then latency with the two paths interleaved in every
    lane (a gateway request and a direct one, each first in every other pair), so that drift
    in the machine's load falls on both alike."""
    model, client = env.settings.model, AsyncInferqClient(env.settings)
    auth = {"Authorization": f"Bearer {key}"}
    body = json.dumps({"model": model, **CHAT}).encode()
    request = request_bytes("127.0.0.1", "/v1/chat/completions", body, auth)
    lanes: dict[int, KeepAlive] = {}  # each lane's own connection

    async def via_gateway() -> None:
        lane = id(asyncio.current_task())
        connection = lanes.setdefault(lane, KeepAlive("127.0.0.1", port, request))
        status, answer = await connection.send()
        assert status == 200, answer

    async def direct() -> None:
        job = await client.submit(messages=CHAT["messages"], params={"max_tokens": 4})
        assert (await client.wait(job, timeout=120)).status == "done"

    pair_latencies: dict[str, list[float]] = {"gateway": [], "direct": []}
    pairs = itertools.count()

    async def pair() -> None:
        # every other pair the other way round: whichever goes second meets what the worker
        # still does for the first (its commit, its notification)
        order = [("gateway", via_gateway), ("direct", direct)]
        for name, call in order if next(pairs) % 2 else order[::-1]:
            t0 = time.perf_counter()
            await call()
            pair_latencies[name].append(time.perf_counter() - t0)

    await _load(min(n, 100), concurrency, pair)  # warm up
    pair_latencies = {"gateway": [], "direct": []}
    cpu0 = sum(map(proc_cpu_s, pids))
    lean = await asyncio.to_thread(
        load_in_process, port, "/v1/chat/completions", body, auth, n, concurrency
    )
    assert lean["statuses"] == {"200": n}, lean["statuses"]
    cpu_ms = (sum(map(proc_cpu_s, pids)) - cpu0) / n * 1000  # the gateway's, per request
    direct_wall, _ = await _load(n, concurrency, direct)
    await _load(n // 2, concurrency, pair)
    for connection in lanes.values():
        connection.close()
    await client.aclose()
    gateway_lat, direct_lat = pair_latencies["gateway"], pair_latencies["direct"]
    p50 = statistics.median
    return {
        "concurrency": concurrency,
        "gateway_rps": lean["req_s"],
        "direct_rps": n / direct_wall,
        "gateway_p50": p50(gateway_lat) * 1000,
        "gateway_p95": sorted(gateway_lat)[int(len(gateway_lat) * 0.95)] * 1000,
        "direct_p50": p50(direct_lat) * 1000,
        "cpu_ms": cpu_ms,
    }


def _batch(base: str, key: str, model: str, lines: int) -> dict:
    """A `lines`-line batch: upload, create, wait, download; custom_ids one to one."""
    body = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, **CHAT},
            }
        )
        + "\n"
        for i in range(lines)
    )
    out: dict = {"lines": lines}
    with httpx.Client(
        base_url=base, timeout=600, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        t0 = time.perf_counter()
        files = {"file": ("b.jsonl", io.BytesIO(body.encode()))}
        uploaded = http.post("/files", files=files, data={"purpose": "batch"}).json()
        out["upload_s"] = time.perf_counter() - t0
        batch = http.post(
            "/batches",
            json={
                "input_file_id": uploaded["id"],
                "completion_window": "24h",
                "endpoint": "/v1/chat/completions",
            },
        ).json()
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.5)
            batch = http.get(f"/batches/{batch['id']}").json()
        out["run_s"] = time.perf_counter() - t0 - out["upload_s"]
        t1 = time.perf_counter()
        text = http.get(f"/files/{batch['output_file_id']}/content").text
        out["download_s"] = time.perf_counter() - t1
    ids = [json.loads(line)["custom_id"] for line in text.splitlines()]
    out["status"], out["counts"] = batch["status"], batch["request_counts"]
    out["one_to_one"] = sorted(ids) == sorted(f"r{i}" for i in range(lines)) and len(ids) == len(
        set(ids)
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--batch-lines", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes")
    parser.add_argument(
        "--engine", choices=("null", "model"), default="null", help="model: the default model"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = _port()
    base = f"http://127.0.0.1:{port}/v1"
    rows, batch = [], None
    with ServiceEnv("gateway") as env:
        key = ApiKeys(env.url).create("bench")[1]
        engine = {"INFERQ_ENGINE": "null"} if args.engine == "null" else {}
        worker = start_worker(env, engine, args.out / "gateway_worker.log")
        gateway = _serve(env, port, args.workers, args.out / "gateway_serve.log")
        try:
            _wait_ready(base, key)
            pids = [gateway.pid, *_children(gateway.pid)]
            for c in (int(c) for c in args.concurrency.split(",") if c):
                n = args.requests if c > 1 else min(args.requests, 300)
                rows.append(asyncio.run(_measure(env, port, key, n, c, pids)))
                print(rows[-1], flush=True)
            if args.batch_lines:
                batch = _batch(base, key, env.settings.model, args.batch_lines)
                print(batch, flush=True)
        finally:
            stop_worker(gateway)
            stop_worker(worker)
    _write(args.out / "gateway_bench.md", rows, batch)


def _children(pid: int) -> list[int]:
    """The processes `pid` forked (`inferq serve --workers N`)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_ready(base: str, key: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            models = httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {key}"})
            if models.status_code == 200 and models.json()["data"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the gateway or the worker did not come up")


def _write(path: Path, rows: list[dict], batch: dict | None) -> None:
    lines = [
        "| concurrency | gateway req/s | direct jobs/s | gateway p50 ms | gateway p95 ms "
        "| direct p50 ms | added p50 ms | gateway CPU ms/request |",
        "|---|---|---|---|---|---|---|---|",
    ][: 2 if rows else 0]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['gateway_rps']:.0f} | {r['direct_rps']:.0f} | "
            f"{r['gateway_p50']:.1f} | {r['gateway_p95']:.1f} | {r['direct_p50']:.1f} | "
            f"{r['gateway_p50'] - r['direct_p50']:.1f} | {r['cpu_ms']:.2f} |"
        )
    if batch:
        lines += [
            *([""] if rows else []),
            "| batch lines | upload s | run s | download s | status | completed / "
            "failed | custom_ids one to one |",
            "|---|---|---|---|---|---|---|",
            f"| {batch['lines']} | {batch['upload_s']:.1f} | {batch['run_s']:.1f} | "
            f"{batch['download_s']:.1f} | {batch['status']} | "
            f"{batch['counts']['completed']} / {batch['counts']['failed']} | "
            f"{batch['one_to_one']} |",
        ]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
