"""HF `generate` baselines vs the paged engine on one seeded workload: one table, one run.

Usage: .venv/bin/python bench/engine_bench.py [--jobs 256] [--baseline-jobs 48] [--seed 0]
       [--max-num-seqs 128] [--max-new 128] [--dtypes float32,bfloat16] [--out bench/out]
       [--peers auto|none|vllm,llama] [--no-gptq] [--portable-gptq DIR] [--no-equal-work]
Workload: `--jobs` chat jobs over 4 system prompts of 200-400 tokens, user parts of 10-120
tokens, max_tokens uniform in [16, --max-new], greedy, shuffled. A row's jobs all arrive at its
t=0; the slow HF baselines run only the first `--baseline-jobs` of the arrival order.
Four rows per dtype (the same weights, cast): fp32 is the exact comparison; bf16 is how the
worker runs on CPU (GPTQ models always, fp models with INFERQ_DTYPE=bfloat16).
- HF rows: `model.generate` (sdpa, greedy) over FIFO batches (1, or 16 left-padded with
  `attention_mask`, `max_new_tokens` = the batch's largest, a per-row stopping criterion at each
  job's max_tokens; HF keeps computing finished rows). The stopping criterion runs right after
  each step's tokens are sampled and timestamps it, so TTFT = batch start + its first step
  (that run's own prefill, no extra 1-token run); latency = the batch's return (HF returns the
  batch at once). Computed positions = rows x (padded width + decode steps - 1).
- engine rows: `run_to_completion(PagedEngine, all jobs)`, timings from each output; computed
  positions = the engine's own counter (recompute after preemption included).
- needed = prompt + fed-back generated tokens - prefix-cache hits; waste = 1 - needed/computed.
- prefix hit = cached tokens / shareable = sum over jobs of the templated system block length,
  minus one job's per system prompt. Hits are block-granular and may run past the system block.
- share of peak = 2 x non-embedding params x computed positions / wall / the row dtype's
  torch.mm 2048^2 peak (best of 5, this run and device); attention scores and LM head not
  counted (lower bound).
Ceiling per dtype: the engine row's computed positions and output tokens priced at the time
the model's own linear-layer shapes (and the LM head, per output token) take in steps of
`--max-num-seqs` rows on random weights: what the engine could reach if attention, norms and
sampling cost nothing.
Peers (`make peers`; `--peers auto`, the default, runs those installed): per dtype, after the
engine rows, the same jobs (prompt ids, max_tokens, all at t=0) through vLLM CPU with automatic
prefix caching (`vllm-cpu-apc`, its own venv) and llama.cpp's llama-server with 16 slots and 16
clients (F32 GGUF for fp32, BF16 GGUF for bf16): bench/peers/. Their output tokens exclude EOS
like the engine's; prefix hit = their cached prompt tokens / shareable; computed positions
unknown ("-"). GPTQ row (`--no-gptq` skips it): the engine with prefix cache on the default
GPTQ 4-bit model (bf16 activations on CPU), same jobs, after the bf16 rows. With vLLM among
the peers, the engine and vLLM (bf16 activations) then run the portable checkpoint
(`--portable-gptq`, default .peers/gptq-sym: `inferq model quantize FP DIR --sym`, which `make
peers` writes; vLLM CPU refuses the asymmetric default), rows tagged `gptq-sym`
(bench/gptq_section.py). The 4-bit model stops on EOS at other points (other output token
counts: with fewer, more of its time goes to prompts, which yield no output tokens), so an
equal-work pair follows (`--no-equal-work` skips it): the bf16 and GPTQ engines again with
EOS ignored (`engine-prefix-cache-to-max`), every job generating its max_tokens in both.
Correctness guard: the fp32 engine rows' greedy tokens must equal HF one-at-a-time fp32's on
the baseline subset (asserted after the table is written). bf16 rows report their agreement
with HF bf16 (bf16 rounding differs with batch shape, so near-ties may flip).
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import time
from pathlib import Path

import torch
from benchrow import Job, Row, table_lines  # bench/benchrow.py, beside this script
from enginerow import engine_row  # bench/enginerow.py
from gptq_section import gptq_rows, gptq_verdicts  # bench/gptq_section.py
from limits import Ceiling, matmul_dtype, matmul_peak_gflops  # bench/limits.py, beside this script
from peers.rows import (  # bench/peers/rows.py
    GPTQ_SYM,
    PORTABLE_TAG,
    parse_peers,
    peer_rows,
    peer_setup,
    peer_verdicts,
)
from plot import plot_table  # bench/plot.py, beside this script
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from inferq.settings import FP_MODEL, get_settings
from worker.engine.codec import TextCodec
from worker.prep.models import resolve_model

TEXT = """The river flooded the lower town twice last spring. Our quarterly revenue grew by eight
percent, driven mostly by new subscriptions. Please answer in plain language and avoid jargon.
The museum reopens on Tuesday after a long renovation of its east wing. Photosynthesis turns
light, water and carbon dioxide into sugar and oxygen. Customers may return unopened items
within thirty days of purchase. The recipe calls for two cups of flour and a pinch of salt.
Always cite the document section you relied on. Trains to the airport leave every fifteen
minutes from platform four. The committee postponed its vote until the budget figures are
final. Keep answers short unless the user asks for detail. The bridge was designed to flex
slightly in strong winds. Our support desk is open from nine to five on weekdays. Saturn has
more known moons than any other planet. Do not reveal internal account numbers to anyone. The
library lends laptops for up to two weeks. Volcanic soil is often very fertile. Shipping is
free on orders above fifty dollars. If you are unsure, say so instead of guessing. Invoices
are due within forty-five days of issue. Passwords must be at least twelve characters long.
The glacier has retreated nearly a kilometre since records began."""
QUESTIONS = """What time does the support desk open? How long can I borrow a laptop? Why did the
committee postpone the vote? Can you summarise the return policy? Which platform do airport
trains leave from? How much flour does the recipe need? Is shipping free on my order of forty
dollars? How far has the glacier retreated? Why is volcanic soil fertile?"""
SENTENCES = re.split(r"(?<=[.?!])\s+", " ".join(TEXT.split()))
ASKS = re.split(r"(?<=[.?!])\s+", " ".join(QUESTIONS.split()))
PERSONAS = ["a careful librarian", "a billing clerk", "a travel desk agent", "a science tutor"]
BATCH = 16
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def build_workload(
    tok, codec: TextCodec, n: int, seed: int, max_new: int
) -> tuple[list[Job], list[int]]:
    """Seeded jobs in arrival order, and each system prompt's templated block length."""
    rng = random.Random(seed)

    def fill(text: str, pool: list[str], target: int) -> str:
        while len(tok(text)["input_ids"]) < target:
            text = f"{text} {rng.choice(pool)}".strip()
        return text

    head = "You are {}, assistant #{} of the Harbor Co-op."
    systems = [
        fill(head.format(p, k), SENTENCES, rng.randint(200, 400)) for k, p in enumerate(PERSONAS)
    ]
    jobs = []
    for _ in range(n):
        k = rng.randrange(len(systems))
        user = fill("", SENTENCES + ASKS, rng.randint(10, 120))
        msgs = [{"role": "system", "content": systems[k]}, {"role": "user", "content": user}]
        jobs.append(Job("", k, codec.encode(None, msgs), rng.randint(min(16, max_new), max_new)))
    rng.shuffle(jobs)
    blocks = [tok.apply_chat_template([{"role": "system", "content": s}]) for s in systems]
    blocks = [list(b["input_ids"]) for b in blocks]
    for i, job in enumerate(jobs):
        job.seq_id, block = f"job-{i:04d}", blocks[job.system]
        assert job.prompt_ids[: len(block)] == block, "system block is not a prompt prefix"
    return jobs, [len(b) for b in blocks]


def shareable_tokens(jobs: list[Job], sys_lens: list[int]) -> int:
    """System-block tokens a prefix cache could serve: all but one job's per system prompt."""
    counts = [sum(j.system == k for j in jobs) for k in range(len(sys_lens))]
    return sum((c - 1) * n for c, n in zip(counts, sys_lens, strict=True) if c)


class RowMaxTokens(StoppingCriteria):
    """Per-row max_tokens inside one HF batch; also timestamps every decoding step (HF calls
    stopping criteria right after each step's tokens are sampled)."""

    def __init__(self, width: int, batch: list[Job]):
        self.width, self.limits = width, torch.tensor([j.max_tokens for j in batch])
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return (input_ids.shape[1] - self.width) >= self.limits.to(input_ids.device)


@torch.inference_mode()
def hf_row(name: str, model, tok, codec: TextCodec, jobs: list[Job], size: int) -> Row:
    """HF `generate` over FIFO batches of `size` (1: one job at a time), left-padded."""
    row, start = Row(name, len(jobs)), time.perf_counter()
    for b in range(0, len(jobs), size):
        batch = jobs[b : b + size]
        enc = tok.pad({"input_ids": [j.prompt_ids for j in batch]}, return_tensors="pt")
        width = enc["input_ids"].shape[1]
        clock = RowMaxTokens(width, batch)
        out = model.generate(
            **{k: v.to(model.device) for k, v in enc.items()},
            max_new_tokens=max(j.max_tokens for j in batch),
            do_sample=False,
            eos_token_id=sorted(codec.eos_ids),
            pad_token_id=codec.pad_id,
            stopping_criteria=StoppingCriteriaList([clock]),
        ).tolist()
        end = time.perf_counter()
        row.computed += len(batch) * (len(out[0]) - 1)  # padded width + decode steps - 1
        for gen, job in zip(out, batch, strict=True):
            new = gen[width:]
            cut = next((i for i, t in enumerate(new) if t in codec.eos_ids), len(new))
            row.needed += len(job.prompt_ids) + min(cut + 1, job.max_tokens) - 1
            toks = new[: min(cut, job.max_tokens)]
            row.add(job.seq_id, toks, end - start, clock.times[0] - start)
    row.wall_s = time.perf_counter() - start
    return row


def dtype_rows(
    args, path: str, tok, jobs: list[Job], shareable: int, dtype: str, notes: list[str]
) -> list[Row]:
    """The rows of one dtype: HF one at a time, HF static 16, engine without/with cache, then
    the peers'."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).to(args.device)
    codec = TextCodec(tok, model.generation_config)
    base, tag = jobs[: args.baseline_jobs], SHORT[dtype]
    hf_row("warm-up", model, tok, codec, base[:2], 2)  # kernel set-up, not charged to rows
    rows = [hf_row(f"hf-one-at-a-time {tag}", model, tok, codec, base, 1)]
    rows.append(hf_row(f"hf-static-{BATCH} {tag}", model, tok, codec, base, BATCH))
    del model
    gc.collect()
    for cache in (False, True):
        cfg = get_settings().engine_config(prefix_cache=cache, max_num_seqs=args.max_num_seqs)
        name = f"engine-{'prefix-cache' if cache else 'no-prefix-cache'} {tag}"
        rows.append(engine_row(name, path, args.device, jobs, cfg, shareable, dtype))
    setup = peer_setup(path, sorted(codec.eos_ids))
    peers = args.out / "peers"
    return rows + peer_rows(args.peers, dtype, tag, jobs, shareable, setup, peers, notes)


def verdict_lines(
    rows: dict[str, Row], ceilings: dict[str, Ceiling], step_rows: int
) -> tuple[list[str], dict[str, list]]:
    """Speed-ups, the issue's targets per dtype, the linear-layer ceiling, greedy agreement
    with HF one at a time (the equal-work rows, EOS ignored, have gptq_verdicts' line only)."""
    tags = list(ceilings)
    lines, wrong = [""], {}
    rows = {name: r for name, r in rows.items() if "-to-max " not in name}
    for tag in tags:
        best, one = rows[f"engine-prefix-cache {tag}"], rows[f"hf-one-at-a-time {tag}"]
        static = rows[f"hf-static-{BATCH} {tag}"]
        lines += [
            f"- {best.name} vs {r.name}: {best.tps / r.tps:.2f}x"
            for r in rows.values()
            if r is not best and r.name.endswith(tag)
        ]
        checks = [
            (f"≥4x {static.name}", best.tps / static.tps >= 4),
            (f"≥20x {one.name}", best.tps / one.tps >= 20),
            ("prefix hit rate ≥90%", (best.hit or 0.0) >= 0.9),
            ("padding waste ≤5%", 1 - best.needed / best.computed <= 0.05),
        ]
        lines += [f"- {tag} target {t}: {'MET' if ok else 'NOT MET'}" for t, ok in checks]
        cap = ceilings[tag].tokens_per_s(best.computed, best.out_tokens)
        lines.append(
            f"- {tag} ceiling: {best.name}'s linear layers alone, at their measured speed in "
            f"{step_rows}-row steps (attention, norms, sampling taken as free), allow "
            f"{cap:.1f} tok/s = {cap / one.tps:.2f}x {one.name}"
        )
        for r in rows.values():
            if r is not one and r.name.endswith(tag):
                bad = [s for s, t in one.outputs.items() if r.outputs.get(s) != t]
                wrong[r.name] = bad
                lines.append(
                    f"- greedy tokens equal to {one.name}: {r.name} "
                    f"{len(one.outputs) - len(bad)}/{len(one.outputs)}"
                )
    if len(tags) > 1:  # the reference baseline is HF generate in fp32
        fast, ref = rows[f"engine-prefix-cache {tags[-1]}"], rows[f"hf-one-at-a-time {tags[0]}"]
        lines.append(f"- across dtypes: {fast.name} vs {ref.name}: {fast.tps / ref.tps:.2f}x")
    return lines, wrong


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [
        ("jobs", 256),
        ("baseline-jobs", 48),
        ("seed", 0),
        ("max-num-seqs", 128),
        ("max-new", 128),
    ]:
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, fp32 first")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--peers", default="auto", help="auto (installed ones), none, or vllm,llama")
    ap.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--portable-gptq", type=Path, default=GPTQ_SYM, help="symmetric GPTQ dir")
    ap.add_argument("--equal-work", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    args.peers = parse_peers(args.peers)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(resolve_model(get_settings(), FP_MODEL))
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    codec = TextCodec(tok, model.generation_config)
    if tok.pad_token_id is None:
        tok.pad_token_id = codec.pad_id
    jobs, sys_lens = build_workload(tok, codec, args.jobs, args.seed, args.max_new)
    shareable = shareable_tokens(jobs, sys_lens)
    embeds = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in embeds)
    dtypes = args.dtypes.split(",")
    device = torch.device(args.device)
    runs_as = {SHORT[d]: matmul_dtype(getattr(torch, d), device) for d in dtypes}
    peaks = {tag: matmul_peak_gflops(device, dt) for tag, dt in runs_as.items()}
    ceilings = {
        tag: Ceiling.measure(model, args.max_num_seqs, device, dt) for tag, dt in runs_as.items()
    }
    del model
    lens = sorted(len(j.prompt_ids) for j in jobs)
    print(f"{len(jobs)} jobs; system blocks {sys_lens}; prompts {lens[0]}-{lens[-1]} tokens")

    notes: list[str] = []
    rows = [r for d in dtypes for r in dtype_rows(args, path, tok, jobs, shareable, d, notes)]
    if args.gptq:
        rows += gptq_rows(args, jobs, shareable, sorted(codec.eos_ids), notes)
    by_name = {r.name: r for r in rows}
    verdicts, wrong = verdict_lines(by_name, ceilings, args.max_num_seqs)
    verdicts += peer_verdicts(by_name, [*ceilings, PORTABLE_TAG]) + gptq_verdicts(by_name) + notes
    peak_text = ", ".join(f"{t} {g:.1f}" for t, g in peaks.items())
    widened = [SHORT[d] for d in dtypes if runs_as[SHORT[d]] != getattr(torch, d)]
    if widened:
        peak_text += (
            f" ({', '.join(widened)}: the engine's matmuls run in fp32 on this CPU, "
            "no bf16 matmul in oneDNN here; peak and ceiling are fp32's)"
        )
    lines = table_lines(rows, dense, peaks) + verdicts
    lines.append(
        f"- baselines ran the first {args.baseline_jobs} of {len(jobs)} jobs (arrival order); "
        f"FLOPs = 2 x {dense / 1e6:.1f}M non-embedding params x computed positions (no "
        f"attention/LM head); matmul peak GFLOP/s: {peak_text}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_bench.md").write_text(table + "\n")
    try:
        plot_table(args.out / "engine_bench.md", args.out / "engine_bench.png")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    for name, bad in wrong.items():  # the correctness guard: a real check, after the report
        exact = name.endswith(SHORT["float32"]) and name.startswith("engine")
        assert not exact or not bad, f"{name} != HF greedy on {bad[:5]}"


if __name__ == "__main__":
    main()
