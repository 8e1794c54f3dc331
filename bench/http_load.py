"""A lean HTTP/1.1 load generator for the gateway benchmarks: keep-alive connections, each
sending one request at a time (the same prebuilt bytes) and reading its answer (the status
line, the headers up to `Content-Length`, the body). It costs a few tens of microseconds per
request, against about a millisecond for httpx, so that on a 2-core machine the load takes
little of what the gateway is measured on.

`run_load(...)` in one process, or `python bench/http_load.py HOST PORT PATH BODY_FILE N
CONCURRENCY [HEADER ...]` in its own (prints one JSON line: requests/s, p50/p95 ms, statuses).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def request_bytes(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += ["Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class KeepAlive:
    """One keep-alive connection sending the same prebuilt request, one at a time."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self) -> tuple[int, bytes]:
        """The answer's status and body."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(self.request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self._reader.readexactly(length) if length else b""
        return int(head[9:12]), body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def _lane(host: str, port: int, request: bytes, left, latencies, statuses) -> None:
    connection = KeepAlive(host, port, request)
    try:
        for _ in left:
            t0 = time.perf_counter()
            status, _ = await connection.send()
            latencies.append(time.perf_counter() - t0)
            statuses[status] += 1
    finally:
        connection.close()


async def run_load(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str], n: int, concurrency: int
) -> dict:
    """Send `n` requests over `concurrency` connections; requests/s, latency and statuses."""
    request = request_bytes(host, path, body, headers)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    left = iter(range(n))
    t0 = time.perf_counter()
    lanes = (_lane(host, port, request, left, latencies, statuses) for _ in range(concurrency))
    await asyncio.gather(*lanes)
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "req_s": n / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
        "statuses": dict(statuses),
    }


def load_in_process(
    port: int, path: str, body: bytes, headers: dict[str, str], n: int, concurrency: int
) -> dict:
    """`run_load` on 127.0.0.1 in a process of its own (so that this one's CPU is not the
    load's); its answer."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        cmd = [sys.executable, __file__, "127.0.0.1", str(port), path, f.name, str(n)]
        cmd += [str(concurrency), *(f"{k}: {v}" for k, v in headers.items())]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main(argv: list[str]) -> None:
    host, port, path, body_file, n, concurrency, *pairs = argv
    headers = dict(p.split(": ", 1) for p in pairs)
    body = Path(body_file).read_bytes()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    out = run(run_load(host, int(port), path, body, headers, int(n), int(concurrency)))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
