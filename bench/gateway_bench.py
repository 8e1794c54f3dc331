"""Gateway benchmark: requests/s and latency through `inferq serve` against going straight
to the queue with `AsyncInferqClient`, on the null engine (so the service's own cost is all
that is measured), and a batch file round trip (upload, run, download, custom_ids one to one).

Usage: .venv/bin/python bench/gateway_bench.py [--requests 2000] [--concurrency 1,64]
[--batch-lines 10000] [--out bench/out]
Needs the local Redis and PostgreSQL. One worker process (INFERQ_ENGINE=null) and one gateway
process (`inferq serve`) start on a fresh database; the load comes from this process (httpx,
asyncio). Latency is per request, send to answer, as the caller sees it; "added" is the
gateway's p50 minus the direct client's p50 at the same concurrency. Everything shares the
machine's cores: the worker, the gateway, Redis, PostgreSQL and the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
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


def _serve(env: ServiceEnv, port: int, log: Path) -> subprocess.Popen:
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
    env: ServiceEnv, base: str, key: str, n: int, concurrency: int, pid: int
) -> dict:
    """Throughput of each path alone (`n` requests each), then latency with the two paths
    interleaved in every lane (a gateway request, then a direct one), so that drift in the
    machine's load falls on both alike."""
    model = env.settings.model
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = AsyncInferqClient(env.settings)
    async with httpx.AsyncClient(
        base_url=base, timeout=120, limits=limits, headers={"Authorization": f"Bearer {key}"}
    ) as http:

        async def via_gateway() -> None:
            answer = await http.post("/chat/completions", json={"model": model, **CHAT})
            assert answer.status_code == 200, answer.text

        async def direct() -> None:
            job = await client.submit(messages=CHAT["messages"], params={"max_tokens": 4})
            assert (await client.wait(job, timeout=120)).status == "done"

        pair_latencies: dict[str, list[float]] = {"gateway": [], "direct": []}

        async def pair() -> None:
            for name, call in (("gateway", via_gateway), ("direct", direct)):
                t0 = time.perf_counter()
                await call()
                pair_latencies[name].append(time.perf_counter() - t0)

        await _load(min(n, 100), concurrency, pair)  # warm up
        pair_latencies = {"gateway": [], "direct": []}
        cpu0 = proc_cpu_s(pid)
        gateway_wall, _ = await _load(n, concurrency, via_gateway)
        cpu_ms = (proc_cpu_s(pid) - cpu0) / n * 1000  # the gateway process's, per request
        direct_wall, _ = await _load(n, concurrency, direct)
        await _load(n // 2, concurrency, pair)
    await client.aclose()
    gateway_lat, direct_lat = pair_latencies["gateway"], pair_latencies["direct"]
    p50 = statistics.median
    return {
        "concurrency": concurrency,
        "gateway_rps": n / gateway_wall,
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
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = _port()
    base = f"http://127.0.0.1:{port}/v1"
    rows, batch = [], None
    with ServiceEnv("gateway") as env:
        key = ApiKeys(env.url).create("bench")[1]
        worker = start_worker(env, {"INFERQ_ENGINE": "null"}, args.out / "gateway_worker.log")
        gateway = _serve(env, port, args.out / "gateway_serve.log")
        try:
            _wait_ready(base, key)
            for c in map(int, args.concurrency.split(",")):
                n = args.requests if c > 1 else min(args.requests, 300)
                rows.append(asyncio.run(_measure(env, base, key, n, c, gateway.pid)))
                print(rows[-1], flush=True)
            if args.batch_lines:
                batch = _batch(base, key, env.settings.model, args.batch_lines)
                print(batch, flush=True)
        finally:
            stop_worker(gateway)
            stop_worker(worker)
    _write(args.out / "gateway_bench.md", rows, batch)


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
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['gateway_rps']:.0f} | {r['direct_rps']:.0f} | "
            f"{r['gateway_p50']:.1f} | {r['gateway_p95']:.1f} | {r['direct_p50']:.1f} | "
            f"{r['gateway_p50'] - r['direct_p50']:.1f} | {r['cpu_ms']:.2f} |"
        )
    if batch:
        lines += [
            "",
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
