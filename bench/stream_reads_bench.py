"""Stream readers' CPU: `AsyncInferqClient.stream` on many jobs at once, their streams
written as the service benchmark's are (64 jobs at a time, one entry each per step, a step
every 250 ms, each job 100 entries then its end), the reading process's CPU per mode:
`shared` (now: one XREAD over every stream, `api_client/stream_reads.py`) and `per-stream`
(an XREAD per stream and entry on a connection of its own, as before). The writer runs in a
process of its own; each mode reads its own streams.

Usage: .venv/bin/python bench/stream_reads_bench.py [--jobs 256] [--modes shared,per-stream]
[--rounds 1]  (the local Redis, INFERQ_BENCH_REDIS; writes nothing else)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import redis

from api_client import AsyncInferqClient
from api_client.results import stream_key
from api_client.stream_reads import AsyncStreamReads
from inferq.settings import get_settings

REDIS = os.environ.get("INFERQ_BENCH_REDIS", "redis://127.0.0.1:6379/9")
ENTRIES, RUNNING, STEP_S, TEXT = 100, 64, 0.25, "word "


def write(ids: list[str]) -> None:
    """The worker's side: each step, an entry for each running job, in one pipeline."""
    r, waiting, running = redis.Redis.from_url(REDIS), list(ids), {}
    while waiting or running:
        while len(running) < RUNNING and waiting:
            running[waiting.pop(0)] = 0
        pipe = r.pipeline(transaction=False)
        for job, n in list(running.items()):
            fields = {"o": n * len(TEXT), "d": TEXT} | ({"end": "stop"} if n == ENTRIES - 1 else {})
            pipe.xadd(stream_key(job), fields)
            pipe.expire(stream_key(job), 600)
            running[job] = n + 1
            if n == ENTRIES - 1:
                del running[job]
        pipe.execute()
        time.sleep(STEP_S)


async def _per_stream(self: AsyncStreamReads, key, last_id, count: int, block_ms: int):
    got = await self._control.xread({key: last_id}, count, block_ms)
    return got[0][1] if got else []


async def _read(ids: list[str]) -> list[str]:
    client = AsyncInferqClient(get_settings(broker_url=REDIS), "bench")

    async def one(job: str) -> str:
        return "".join([d async for d in client.stream(job, 600)])

    try:
        return await asyncio.gather(*(one(j) for j in ids))
    finally:
        await client.aclose()


def measure(mode: str, jobs: int) -> dict:
    if mode == "per-stream":
        AsyncStreamReads.read = _per_stream  # type: ignore[method-assign]
    ids = [str(uuid.uuid4()) for _ in range(jobs)]
    writer = subprocess.Popen([sys.executable, __file__, "--write", *ids])
    cpu0, t0 = time.process_time(), time.perf_counter()
    texts = asyncio.run(_read(ids))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    writer.wait()
    redis.Redis.from_url(REDIS).delete(*(stream_key(j) for j in ids))
    whole = sum(t == TEXT * ENTRIES for t in texts)
    return {"mode": mode, "cpu_s": cpu, "wall_s": wall, "whole": whole, "jobs": jobs}


def main() -> None:
    if sys.argv[1:2] == ["--write"]:
        return write(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--modes", default="shared,per-stream")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print("| round | mode | reader CPU s | CPU us per entry | wall s | whole texts |")
    print("|---|---|---|---|---|---|")
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):  # a process each: per-stream patches the class
            cmd = [sys.executable, __file__, "--one", mode, str(args.jobs)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out)
            per_entry = row["cpu_s"] / (row["jobs"] * ENTRIES) * 1e6
            print(
                f"| {rnd + 1} | {mode} | {row['cpu_s']:.2f} | {per_entry:.0f} | "
                f"{row['wall_s']:.1f} | {row['whole']}/{row['jobs']} |",
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
