"""Engine throughput per model family on same-size random-weight models (fp32, CPU).

Usage: PYTHONPATH=. .venv/bin/python bench/family_bench.py [--families llama,qwen3,...]
       [--jobs 32] [--max-new 64] [--out bench/out/family_bench.md]
Each family's model is built offline by tests/engine/tiny_models.py at SmolLM2-135M's shape
(hidden 576, 30 layers, 9 query heads of 64 over 3 KV heads, MLP 1536, vocabulary 49152,
untied head; windowed families a 512-token window, local and global layers alternating),
random weights, saved once under --cache. Workload: --jobs prompts of 4 shared
128-token prefixes plus 16-96 own tokens (random ids), --max-new tokens each, EOS ignored
(equal work), all at t=0, through `run_to_completion` on the default engine config after a
warm-up. Reports the path the engine took (lean, generic modules + C attention, torch
attention), output tokens/s and the wall time.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from tests.engine.tiny_models import FAMILIES, config, save
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine

SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
}
WINDOWED = {"sliding_window": 512}  # Gemma 3's own; Mistral v0.1 and Gemma 2 use 4096


def _shape(family: str) -> dict:
    """SHAPE, plus a real-size window and a per-layer pattern where the family has them."""
    extra = FAMILIES[family][1]
    shape = dict(SHAPE)
    if "sliding_window" in extra:
        shape.update(WINDOWED)
    if "layer_types" in extra:  # local/global alternation over all the layers
        shape["layer_types"] = (extra["layer_types"] * SHAPE["num_hidden_layers"])[
            : SHAPE["num_hidden_layers"]
        ]
    return shape


def _path(engine: PagedEngine) -> str:
    runner = engine.runner
    if runner.lean is not None:
        return "lean"
    return "generic, C attention" if runner.native else "generic, torch attention"


def _jobs(count: int, max_new: int, seed: int) -> list[EngineRequest]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 49152) for _ in range(128)] for _ in range(4)]
    params = SamplingParams(max_tokens=max_new)
    return [
        EngineRequest(
            seq_id=i,
            prompt_ids=prefixes[i % 4]
            + [rng.randrange(3, 49152) for _ in range(rng.randint(16, 96))],
            params=params,
            ignore_eos=True,
        )
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/inferq-family-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/family_bench.md"))
    args = parser.parse_args()
    lines = [
        f"threads {torch.get_num_threads()}, {args.jobs} jobs x {args.max_new} new tokens",
        "",
        "| family | path | output tok/s | wall s |",
        "|---|---|---|---|",
    ]
    for family in args.families.split(","):
        path = args.cache / family
        if not (path / "config.json").is_file():
            save(config(family, **_shape(family)), path)
        engine = PagedEngine(str(path), family, device="cpu", dtype="float32")
        engine.warm_up()
        jobs = _jobs(args.jobs, args.max_new, seed=0)
        started = time.perf_counter()
        outs = run_to_completion(engine, jobs)
        wall = time.perf_counter() - started
        tokens = sum(len(o.token_ids) for o in outs)
        lines.append(f"| {family} | {_path(engine)} | {tokens / wall:.0f} | {wall:.1f} |")
        print(lines[-1], flush=True)
        del engine
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
