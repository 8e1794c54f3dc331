"""Inter-token latency of running sequences while long prompts keep arriving: chunked prefill
off vs on, one table.

Usage: .venv/bin/python bench/chunked_prefill_bench.py [--running 32] [--prompt-tokens 2000]
       [--prompts 8] [--chunk 256] [--dtype float32] [--device cpu] [--out bench/out]
Workload: `--running` sequences (48-token stretches of worker/data/heldout.txt, EOS ignored)
decode throughout; once all of them decode, `--prompt-tokens`-token prompts (stretches of the
same text, each its own tenant: no prefix-cache hits) arrive back to back, one in the engine at
a time, each generating 1 token; after one of them (a warm-up: first-call costs of its shapes),
measured until `--prompts` more have finished.
Rows (the same engine settings but `prefill_chunk_tokens`, a fresh engine each):
- off: `prefill_chunk_tokens` = `max_step_tokens` (2048): a prompt that fits the step's budget
  beside the decodes is prefilled in one step, as before chunked prefill;
- on: `prefill_chunk_tokens` = `--chunk`: each prompt in chunks, one per step, beside the decodes.
Inter-token latency (ITL) = the time between two consecutive tokens of one running sequence
(every running sequence decodes every step, so an ITL is the wall time of a step);
percentiles over all running sequences' ITLs in the window. Also: decode tokens/s of the
running sequences, steps per long prompt (its chunks), and the long prompts' mean time to
first token (from arrival). Prints date, CPU, commit and command with the table, and writes it
to `--out`/chunked_prefill_bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from inferq.params import EngineConfig
from inferq.settings import FP_MODEL, get_settings
from scheduler import Sequence
from worker.engine.api import EngineRequest, SamplingParams
from worker.engine.engine import PagedEngine
from worker.prep.models import resolve_model

HELDOUT = Path(__file__).parents[1] / "worker" / "data" / "heldout.txt"
RUNNING_PROMPT = 48


@dataclass
class Result:
    name: str
    chunk: int
    itl: list[float] = field(default_factory=list)  # seconds
    decode_tokens: int = 0
    wall_s: float = 0.0
    prefill_steps: list[int] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)

    def row(self) -> str:
        p50, p95, top = (1000 * np.percentile(self.itl, q) for q in (50, 95, 100))
        return (
            f"| {self.name} | {self.chunk} | {p50:.1f} | {p95:.1f} | {top:.1f} | "
            f"{self.decode_tokens / self.wall_s:.1f} | {len(self.ttft)} | "
            f"{np.mean(self.prefill_steps):.1f} | {np.mean(self.ttft):.2f} |"
        )


def texts(engine: PagedEngine, args: argparse.Namespace) -> tuple[list, list]:
    """The running sequences' prompts and the long prompts (stretches of the held-out text)."""
    ids = engine.codec.encode(HELDOUT.read_text(), None)
    span = len(ids) - args.prompt_tokens
    assert span > 0, f"--prompt-tokens must be below {len(ids)}"
    room = len(ids) - RUNNING_PROMPT
    running = [ids[(97 * i) % room :][:RUNNING_PROMPT] for i in range(args.running)]
    longs = [ids[(389 * i) % span :][: args.prompt_tokens] for i in range(args.prompts + 1)]
    return running, longs


def measure(name: str, chunk: int, path: str, args: argparse.Namespace) -> Result:
    cfg = get_settings().engine_config(
        prefill_chunk_tokens=chunk, max_num_seqs=max(64, args.running + 1)
    )
    engine = PagedEngine(path, name, device=args.device, dtype=args.dtype, config=cfg)
    engine.warm_up()
    running, longs = texts(engine, args)
    decode = SamplingParams(max_tokens=4096)
    for i, prompt in enumerate(running):
        engine.add(
            EngineRequest(
                seq_id=f"run-{i}",
                prompt_ids=prompt,
                params=decode,
                tenant=f"run-{i}",
                ignore_eos=True,
            )
        )
    seqs = [cast(Sequence, engine.scheduler.get(f"run-{i}")) for i in range(args.running)]
    while any(s.num_outputs == 0 for s in seqs):
        engine.step()
    one = SamplingParams(max_tokens=1)
    for i, prompt in enumerate(longs):  # the first is a warm-up: the window starts after it
        if i <= 1:
            res, start = Result(name, chunk), time.perf_counter()
            last = [(s.num_outputs, start) for s in seqs]
        sid, added, first = f"long-{i}", time.perf_counter(), engine.counters.steps + 1
        engine.add(EngineRequest(seq_id=sid, prompt_ids=prompt, params=one, tenant=sid))
        while True:
            outs = engine.step()
            now = time.perf_counter()
            for k, s in enumerate(seqs):
                n, then = last[k]
                if s.num_outputs > n:
                    res.itl.append((now - then) / (s.num_outputs - n))
                    res.decode_tokens += s.num_outputs - n
                    last[k] = (s.num_outputs, now)
            if any(o.seq_id == sid for o in outs):
                res.prefill_steps.append(engine.counters.steps - first + 1)
                res.ttft.append(now - added)
                break
    res.wall_s = time.perf_counter() - start
    assert all(s.num_outputs < 4096 for s in seqs), "a running sequence ran out of tokens"
    return res


def header(args: argparse.Namespace) -> list[str]:
    """Date, CPU, commit and the command: what a figure must carry."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return [
        f"- {datetime.date.today()}, {cpu}, {torch.get_num_threads()} threads, {args.device}, "
        f"{args.dtype}, commit {commit}",
        f"- command: .venv/bin/python {' '.join(sys.argv)}",
        f"- {args.running} running sequences; {args.prompts} prompts of {args.prompt_tokens} "
        f"tokens back to back; max_step_tokens {EngineConfig().max_step_tokens}",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [("running", 32), ("prompt-tokens", 2000), ("prompts", 8), ("chunk", 256)]:
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(resolve_model(get_settings(), FP_MODEL))
    results = [
        measure("off", EngineConfig().max_step_tokens, path, args),
        measure("on", args.chunk, path, args),
    ]
    off, on = results
    lines = [
        *header(args),
        "| chunking | prefill_chunk_tokens | ITL p50 ms | ITL p95 ms | ITL max ms | "
        "decode tok/s | long prompts | steps per prompt | long prompt TTFT s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(r.row() for r in results),
        "",
        f"- ITL p95 off / on: {np.percentile(off.itl, 95) / np.percentile(on.itl, 95):.2f}x "
        f"(target ≥ 3x); p50 {np.percentile(off.itl, 50) / np.percentile(on.itl, 50):.2f}x",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chunked_prefill_bench.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
