"""The engine benchmark's engine row: `run_to_completion(PagedEngine, all jobs)`, its timings,
computed positions and prefix-cache hits (bench/engine_bench.py, bench/gptq_section.py)."""

from __future__ import annotations

import gc
import time

from benchrow import Job, Row  # bench/, beside this script

from inferq.params import EngineConfig
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine


def engine_row(
    name: str,
    path: str,
    device: str,
    jobs: list[Job],
    cfg: EngineConfig,
    shareable: int,
    dtype: str = "float32",
    ignore_eos: bool = False,
) -> Row:
    """`ignore_eos`: every job runs to its max_tokens (equal work across models)."""
    engine = PagedEngine(path, "bench", device=device, dtype=dtype, config=cfg)
    engine.warm_up()
    params = {j.max_tokens: SamplingParams(max_tokens=j.max_tokens) for j in jobs}
    reqs = [
        EngineRequest(
            seq_id=j.seq_id,
            prompt_ids=j.prompt_ids,
            params=params[j.max_tokens],
            tenant="tenant-a",
            ignore_eos=ignore_eos,
        )
        for j in jobs
    ]
    s0, start, t0 = engine.stats(), time.perf_counter(), time.time()
    outs = run_to_completion(engine, reqs)
    wall = time.perf_counter() - start
    s1 = engine.stats()
    cached = sum(o.cached_tokens for o in outs)
    hits = s1.cache_hit_tokens - s0.cache_hit_tokens
    queried = s1.cache_queried_tokens - s0.cache_queried_tokens
    row = Row(name, len(jobs), wall, s1.computed_tokens - s0.computed_tokens, -cached)
    row.hit = cached / shareable if shareable else None
    row.engine_hit = f"{hits}/{queried} = {hits / max(queried, 1):.1%}"
    for j, o in zip(jobs, outs, strict=True):
        fed = len(o.token_ids) + (o.finish_reason == "stop") - 1  # incl. eos; last not fed
        row.needed += len(j.prompt_ids) + fed
        row.add(o.seq_id, o.token_ids, o.finished_at - t0, o.first_token_at - t0)
    del engine, outs
    gc.collect()
    return row
