"""One llama.cpp row of the engine benchmark: start `llama-server` on a GGUF, run a workload
JSON through it with concurrent clients, write a result JSON (bench/peers/peerio.py).

Usage: python bench/peers/llama_row.py WORKLOAD.json RESULT.json --server .peers/bin/llama-server
       --gguf .peers/gguf/model-f32.gguf [--slots 16]
Server: `-t n -tb n -np SLOTS -c SLOTS*1024` (n = the workload's threads; 1024 tokens per
slot), on a free local port (`--slot-save-path` only so that slots can be erased). After
/health answers, a warm-up on two prompts, then every slot's cache is erased. Then SLOTS client
threads take the jobs in arrival order, each posting /completion with the prompt's token ids,
`n_predict` = max_tokens, `temperature` 0, `cache_prompt`, `return_tokens`, streamed, so TTFT
is the arrival of the first token; cached = the answer's `timings.cache_n`. All jobs count as
arriving at t=0 (the clients' start), so a job's latency includes its wait for a free client.
Stdlib only; the server's log goes beside RESULT.json; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

from peerio import JobResult, PeerJob, read_workload, strip_eos, write_result  # beside this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict | None = None) -> http.client.HTTPResponse:
    """POST `body` as JSON to the local server, or GET `path` when there is no body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{tail}")
        try:
            if post(port, "/health").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"llama-server not healthy after {limit_s}s (log: {log})")


def complete(port: int, job: PeerJob, eos: set[int], t0: float) -> JobResult:
    """One streamed /completion; times are seconds since `t0`."""
    body = {
        "prompt": job.prompt_ids,
        "n_predict": job.max_tokens,
        "temperature": 0,
        "cache_prompt": True,
        "return_tokens": True,
        "stream": True,
    }
    resp = post(port, "/completion", body)
    if resp.status != 200:
        raise RuntimeError(f"{job.seq_id}: HTTP {resp.status}: {resp.read()[:500]!r}")
    tokens: list[int] = []
    ttft, last = None, {}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        last = json.loads(line[len("data: ") :])
        tokens += last.get("tokens") or []
        if tokens and ttft is None:
            ttft = time.perf_counter() - t0
        if last.get("stop"):
            break
    kept, stopped = strip_eos(tokens, eos)
    cached = int(last.get("timings", {}).get("cache_n", 0))
    stopped = stopped or last.get("stop_type") == "eos"
    return JobResult(job.seq_id, kept, stopped, cached, time.perf_counter() - t0, ttft)


def run_clients(port: int, jobs: list[PeerJob], eos: set[int], clients: int) -> dict:
    """All jobs through `clients` threads; results by seq_id, and the wall time."""
    todo: queue.Queue[PeerJob] = queue.Queue()
    for j in jobs:
        todo.put(j)
    results: dict[str, JobResult] = {}
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def client() -> None:
        while not errors:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[job.seq_id] = complete(port, job, eos, t0)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"results": results, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--server", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--slots", type=int, default=16)
    args = ap.parse_args()
    settings, jobs = read_workload(args.workload)
    eos, n, port = set(settings["eos_ids"]), str(settings["threads"]), free_port()
    log = args.result.with_suffix(".server.log")
    cmd = [
        str(args.server),
        "-m",
        str(args.gguf),
        "-t",
        n,
        "-tb",
        n,
        "-np",
        str(args.slots),
        "-c",
        str(args.slots * 1024),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--slot-save-path",
        str(args.result.parent),
    ]
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, log)
        load_s = time.perf_counter() - start
        run_clients(port, [PeerJob(j.seq_id, j.prompt_ids, 8) for j in jobs[:2]], eos, 2)
        for slot in range(args.slots):  # warm-up prompts out of every slot's cache
            resp = post(port, f"/slots/{slot}?action=erase", {})
            assert resp.status == 200, f"slot {slot} erase: HTTP {resp.status} {resp.read()!r}"
        run = run_clients(port, jobs, eos, args.slots)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    results = [run["results"][j.seq_id] for j in jobs]
    setup = f"{args.gguf.name}, {args.slots} slots, {args.slots} clients, -t {n}, cache_prompt"
    write_result(args.result, "llama.cpp llama-server", setup, load_s, run["wall_s"], results)
    print(f"llama-server {args.gguf.name}: {len(jobs)} jobs in {run['wall_s']:.1f}s")


if __name__ == "__main__":
    main()
