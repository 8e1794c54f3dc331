"""Speculative decoding (prompt lookup) off vs on, on the real model: one table, one run.

Usage: .venv/bin/python bench/spec_bench.py [--dtypes float32,bfloat16] [--spec-tokens 4]
       [--max-new 48] [--interactive 1:3,4:8,16:16] [--extractive 1:4,4:8] [--batched 32]
       [--seed 0]
Workloads (greedy; each `c:n` runs n jobs with c in flight, a new one added as one finishes):
- extractive: a passage of the held-out text to quote, repeat with fixes or summarise with
  quotes, and a code snippet to edit (rename a variable, add type hints): answers copy
  their prompt, so lookups find drafts.
- interactive: the engine benchmark's chat jobs (a 200-400 token system prompt, a question),
  one at a time and 4 and 16 at once.
- batched: the engine benchmark's workload (bench/engine_bench.py), all jobs at t=0 (its
  engine row, smaller): more sequences than `INFERQ_SPEC_MAX_RUNNING` decode at once, so
  drafting must cost nothing there.
Each workload runs on two engines built alike but for `spec_tokens` (0: off), in the order
off, on for one workload and on, off for the next (drift is shared); every round has its own
tenant, so no run reuses another's prefix cache. Output tok/s = output tokens / wall; p50 =
median job latency (finished - added); accepted/drafted = the engine's counters; same = jobs
whose tokens equal the off run's (greedy: fp32 must be all).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from engine_bench import build_workload  # bench/engine_bench.py, beside this script
from transformers import AutoTokenizer

from inferq.params import EngineConfig
from inferq.settings import FP_MODEL, get_settings
from worker.engine.api import EngineOutput, EngineRequest, SamplingParams
from worker.engine.codec import TextCodec
from worker.engine.engine import PagedEngine
from worker.prep.models import resolve_model

HELDOUT = Path(__file__).resolve().parents[1] / "worker" / "data" / "heldout.txt"
PASSAGE_ASKS = [
    "Quote the second and third sentences of this passage exactly:",
    "Repeat this passage word for word:",
    "Summarise this passage, quoting its most important sentence:",
]
CODE = '''def running_totals(values, start=0):
    """Totals of values after each one, from start."""
    total = start
    totals = []
    for value in values:
        total = total + value
        totals.append(total)
    return totals


def average(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)
'''
CODE_ASKS = [
    "Rename the variable `total` to `acc` in this code and return the whole code:",
    "Add type hints to this code and return the whole code:",
]


@dataclass
class Result:
    workload: str
    dtype: str
    spec: bool
    jobs: int
    wall_s: float
    output_tokens: int
    p50_s: float
    drafted: int
    accepted: int
    tokens: dict[str, list[int]]


def extractive_prompts(codec: TextCodec, n: int) -> list[list[int]]:
    text = HELDOUT.read_text()
    asks = [(a, text[900 * k : 900 * k + 700]) for k, a in enumerate(PASSAGE_ASKS)]
    asks += [(a, CODE) for a in CODE_ASKS]
    return [
        codec.encode(None, [{"role": "user", "content": f"{ask}\n\n{body}"}])
        for ask, body in (asks[i % len(asks)] for i in range(n))
    ]


def run(
    engine: PagedEngine, prompts: list[list[int]], limits: list[int], concurrency: int, tag: str
) -> tuple[float, list[EngineOutput]]:
    """Closed loop: `concurrency` jobs in flight; the wall time and outputs in job order."""
    pending = deque(
        EngineRequest(
            seq_id=f"{tag}-{i}",
            prompt_ids=ids,
            params=SamplingParams(max_tokens=m),
            tenant=tag,
        )
        for i, (ids, m) in enumerate(zip(prompts, limits, strict=True))
    )
    live: set[object] = set()
    done: dict[object, EngineOutput] = {}
    started = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            request = pending.popleft()
            engine.add(request)
            live.add(request.seq_id)
        for out in engine.step():
            live.discard(out.seq_id)
            done[out.seq_id] = out
    wall = time.perf_counter() - started
    return wall, [done[f"{tag}-{i}"] for i in range(len(prompts))]


def measure(
    engines: dict[bool, PagedEngine],
    order: list[bool],
    workload: str,
    dtype: str,
    prompts: list[list[int]],
    limits: list[int],
    concurrency: int,
) -> list[Result]:
    results = []
    for spec in order:
        engine = engines[spec]
        before = engine.stats()
        tag = f"{workload}-{dtype}-{spec}"
        wall, outs = run(engine, prompts, limits, concurrency, tag)
        after = engine.stats()
        results.append(
            Result(
                workload,
                dtype,
                spec,
                len(prompts),
                wall,
                sum(len(o.token_ids) for o in outs),
                statistics.median(o.finished_at - o.added_at for o in outs),
                after.draft_tokens - before.draft_tokens,
                after.accepted_tokens - before.accepted_tokens,
                {str(i): o.token_ids for i, o in enumerate(outs)},
            )
        )
        print(f"  {workload} {dtype} spec={'on' if spec else 'off'}: {wall:.1f} s", flush=True)
    return results


def pairs(spec: str) -> list[tuple[int, int]]:
    """'1:3,4:8' -> [(1, 3), (4, 8)]: (concurrency, jobs)."""
    return [(int(c), int(n)) for c, n in (p.split(":") for p in spec.split(",") if p)]


def table(results: list[Result]) -> list[str]:
    lines = [
        "| workload | dtype | spec | jobs | output tok/s | p50 latency s | accepted/drafted "
        "| on/off tok/s | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    off = {(r.workload, r.dtype): r for r in results if not r.spec}
    for r in results:
        base = off[(r.workload, r.dtype)]
        rate = r.output_tokens / r.wall_s
        ratio = rate / (base.output_tokens / base.wall_s)
        same = sum(r.tokens[k] == base.tokens[k] for k in r.tokens)
        lines.append(
            f"| {r.workload} | {r.dtype} | {'on' if r.spec else 'off'} | {r.jobs} | {rate:.1f} "
            f"| {r.p50_s:.2f} | {r.accepted}/{r.drafted} | {ratio:.2f}x | {same}/{r.jobs} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--spec-tokens", type=int, default=EngineConfig().spec_tokens or 4)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--extractive", default="1:4,4:8")
    ap.add_argument("--interactive", default="1:3,4:8,16:16")
    ap.add_argument("--batched", type=int, default=32, help="engine-benchmark jobs at t=0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path = resolve_model(get_settings(), FP_MODEL)
    codec = TextCodec.from_model_dir(path)
    tok = AutoTokenizer.from_pretrained(path)
    most = max([n for _, n in pairs(args.interactive)] + [args.batched])
    chat, _ = build_workload(tok, codec, most, args.seed, args.max_new)
    results: list[Result] = []
    flip = False
    for dtype in args.dtypes.split(","):
        engines = {
            spec: PagedEngine(
                path,
                FP_MODEL,
                device="cpu",
                dtype=dtype,
                config=EngineConfig(spec_tokens=args.spec_tokens if spec else 0),
            )
            for spec in (False, True)
        }
        for engine in engines.values():
            engine.warm_up()
        plan = [
            (f"extractive c={c}", extractive_prompts(codec, n), [args.max_new] * n, c)
            for c, n in pairs(args.extractive)
        ]
        plan += [
            (
                f"interactive c={c}",
                [j.prompt_ids for j in chat[:n]],
                [args.max_new] * n,
                c,
            )
            for c, n in pairs(args.interactive)
        ]
        batch = chat[: args.batched]
        plan.append(
            (
                f"batched {len(batch)} at t=0",
                [j.prompt_ids for j in batch],
                [j.max_tokens for j in batch],
                len(batch),
            )
        )
        for workload, prompts, limits, concurrency in plan:
            order = [True, False] if flip else [False, True]
            flip = not flip
            results += measure(engines, order, workload, dtype, prompts, limits, concurrency)
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
