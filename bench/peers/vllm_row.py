"""One vLLM CPU row of the engine benchmark: run a workload JSON with vLLM's offline engine,
write a result JSON (bench/peers/peerio.py describes both).

Usage (in vLLM's own venv, `make peers`):
    .peers/vllm/bin/python bench/peers/vllm_row.py WORKLOAD.json RESULT.json --dtype float32
Settings: automatic prefix caching on, block size 128, vLLM's CPU defaults otherwise
(max_num_seqs 256, max_num_batched_tokens 4096, chunked prefill); the model's OpenMP threads
bound to all `threads` cores (VLLM_CPU_OMP_THREADS_BIND=0-<n-1>: vLLM's default reserves a core
for its scheduler process, leaving one of two), a 4 GiB KV pool (VLLM_CPU_KVCACHE_SPACE=4);
both can be overridden from the environment. Greedy, the workload's EOS ids as stop tokens.
After load, a warm-up on two prompts, then the prefix cache is emptied; all jobs are added at
t=0 and the engine is stepped here, so each job's TTFT and latency are the end of the step
that produced its first and last token. This script must not import the project (vLLM's venv
does not have it); peerio.py is beside it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from peerio import JobResult, read_workload, strip_eos, write_result  # bench/peers/, beside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=128)
    args = ap.parse_args()
    settings, jobs = read_workload(args.workload)
    eos = set(settings["eos_ids"])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{settings['threads'] - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, __version__  # after the environment is set
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as Sampling

    def params(max_tokens: int, kind: RequestOutputKind = RequestOutputKind.DELTA) -> Sampling:
        return Sampling(
            temperature=0.0, max_tokens=max_tokens, stop_token_ids=sorted(eos), output_kind=kind
        )

    start = time.perf_counter()
    llm = LLM(
        model=settings["model"],
        dtype=args.dtype,
        block_size=args.block_size,
        enable_prefix_caching=True,
        seed=0,
    )
    load_s = time.perf_counter() - start
    warm = [TokensPrompt(prompt_token_ids=j.prompt_ids) for j in jobs[:2]]
    llm.generate(warm, params(8, RequestOutputKind.CUMULATIVE), use_tqdm=False)
    assert llm.reset_prefix_cache(), "vLLM did not empty its prefix cache"

    engine = llm.llm_engine
    t0 = time.perf_counter()
    for j in jobs:
        engine.add_request(
            j.seq_id, TokensPrompt(prompt_token_ids=j.prompt_ids), params(j.max_tokens)
        )
    tokens: dict[str, list[int]] = {j.seq_id: [] for j in jobs}  # DELTA: new ids per step
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}  # seq_id: (latency, cached prompt tokens)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            new = o.outputs[0].token_ids if o.outputs else []
            if new:
                tokens[o.request_id] += new
                first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = (now, o.num_cached_tokens or 0)
    wall_s = time.perf_counter() - t0

    results = []
    for j in jobs:
        (end, cached), (kept, stopped) = done[j.seq_id], strip_eos(tokens[j.seq_id], eos)
        results.append(JobResult(j.seq_id, kept, stopped, cached, end, first.get(j.seq_id)))
    bind = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    setup = (
        f"APC on, block {args.block_size}, OMP bind {bind}, "
        f"KV {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB"
    )
    write_result(args.result, f"vLLM {__version__} CPU", setup, load_s, wall_s, results)
    print(f"vllm {args.dtype}: {len(jobs)} jobs in {wall_s:.1f}s (load {load_s:.1f}s)")


if __name__ == "__main__":
    main()
