"""How closely a quantized model follows its fp source in chat use: one table row per model.

Usage: .venv/bin/python bench/gptq_fidelity.py [MODEL_DIR ...] [--max-tokens 160] [--out DIR]
The fp model in fp32 answers PROMPTS greedily through the paged engine (3 system prompts x 24
questions, written for this script: neither calibration text nor the engine benchmark's
workload). Then, per model (default: the fp model in bf16 and the default GPTQ model):
- teacher-forced on fp32's answers (prompt + answer, one forward each), over every answer
  position including the closing end-of-turn token: top-1 = share of positions where the
  model's argmax is fp32's token; KL = mean KL(fp32 || model) in nats per position;
- its own greedy answers through the engine: output tokens with EOS (vs fp32's) and answers
  identical to fp32's;
- perplexity on worker/data/heldout.txt as gptq_report measures it.
Output tokens with EOS decide how much of a run's time yields output (prompt work yields
none), so a quantized model that ends its answers early shows fewer output tok/s on the same
jobs although it runs as fast.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from gptq_report import HELDOUT, perplexity, publish  # bench/gptq_report.py, beside this script
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from inferq.settings import DEFAULT_MODEL, FP_MODEL, get_settings
from worker.engine.api import EngineRequest, FinishReason, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine
from worker.engine.loading import load_causal_lm, pick_device
from worker.prep.models import resolve_model

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant for a travel company. Answer in at most three sentences.",
    "You are a friendly tutor who explains things step by step to a curious student.",
]
QUESTIONS = """What is the capital of France? | Why is the sky blue? | Name a prime number above
10. | Write a haiku about rain. | What is 7 times 8? | Who painted the Mona Lisa? | How many legs
does a spider have? | What is water made of? | Explain gravity. | What is the largest ocean? |
Give me a word that rhymes with cat. | How many days are in a leap year? | Write a Python
function that adds two numbers. | Translate 'good morning' into French. | What is
photosynthesis? | Tell me a short joke. | How do I boil an egg? | What year did the Second World
War end? | How should I pack for a week of hiking? | What does a compiler do? | Suggest a name
for a bakery. | Why do cats purr? | How can I sleep better? | What is inflation?"""
PROMPTS = [(s, q.strip()) for s in SYSTEMS for q in " ".join(QUESTIONS.split()).split("|")]


@dataclass
class Fidelity:
    name: str
    top1: float
    kl: float
    tokens: int
    identical: int
    ppl: float


def chat_ids(tok, system: str, question: str) -> list[int]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def answers(path: str, dtype: str, prompts: list[list[int]], args) -> list[list[int]]:
    """Greedy answers through the paged engine, each ending in `args.eos` where it stopped."""
    engine = PagedEngine(path, "fidelity", device=args.device, dtype=dtype)
    params = SamplingParams(max_tokens=args.max_tokens)
    reqs = [
        EngineRequest(seq_id=f"p{i}", prompt_ids=p, params=params, tenant="t")
        for i, p in enumerate(prompts)
    ]
    outs = run_to_completion(engine, reqs)
    del engine
    gc.collect()
    return [o.token_ids + [args.eos] * (o.finish_reason == FinishReason.STOP) for o in outs]


@torch.inference_mode()
def log_probs(model, prompts: list[list[int]], refs: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, the model's log-probabilities at each reference answer position."""
    out = []
    for p, r in zip(prompts, refs, strict=True):
        logits = model(torch.tensor([p + r]), use_cache=False).logits[0]
        out.append(torch.log_softmax(logits[len(p) - 1 : len(p) + len(r) - 1].float(), -1))
    return out


def measure(name: str, path: str, dtype: str, prompts, refs, ref_lp, args):
    """One model's row (teacher-forced agreement with `ref_lp` on `refs`, its own answers,
    perplexity) and its log-probabilities on `refs`; without `ref_lp` it is the reference."""
    own = answers(path, dtype, prompts, args)
    loaded = load_causal_lm(path, pick_device(args.device), dtype)
    tok = AutoTokenizer.from_pretrained(path)
    ppl = perplexity(loaded.model, tok(HELDOUT.read_text())["input_ids"])
    lp = log_probs(loaded.model, prompts, refs)
    del loaded
    gc.collect()
    pairs = list(zip(ref_lp or lp, lp, strict=True))
    top1 = sum((q.argmax(-1) == b.argmax(-1)).sum().item() for b, q in pairs)
    kl = sum((b.exp() * (b - q)).sum().item() for b, q in pairs)
    positions = sum(map(len, refs))
    tokens = sum(len(a) - (a[-1] == args.eos) for a in own)
    same = sum(a == r for a, r in zip(own, refs, strict=True))
    return Fidelity(name, top1 / positions, kl / positions, tokens, same, ppl), lp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model directories (default: the default GPTQ)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    settings = get_settings()
    fp = resolve_model(settings, FP_MODEL)
    tok = AutoTokenizer.from_pretrained(fp)
    args.eos = tok.eos_token_id
    prompts = [chat_ids(tok, s, q) for s, q in PROMPTS]
    refs = answers(fp, "float32", prompts, args)
    rows = [("fp32", fp, "float32"), ("fp bf16", fp, "bfloat16")]
    models = args.models or [resolve_model(settings, DEFAULT_MODEL)]
    rows += [(Path(m).name, m, "auto") for m in models]
    lines = [
        "| model | top-1 = fp32 | KL vs fp32 | output tokens | vs fp32 | identical | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    base, ref_lp = None, None
    for name, path, dtype in rows:
        r, lp = measure(name, path, dtype, prompts, refs, ref_lp, args)
        base, ref_lp = base or r, ref_lp or lp
        print(f"{name}: {r}", file=sys.stderr, flush=True)
        lines.append(
            f"| {name} | {100 * r.top1:.1f} % | {r.kl:.4f} | {r.tokens:,} | "
            f"{r.tokens / base.tokens:.2f}x | {r.identical}/{len(prompts)} | {r.ppl:.2f} |"
        )
    lines += [
        f"- {len(prompts)} chat prompts, greedy, max_tokens {args.max_tokens}; teacher-forced "
        f"over fp32's {sum(map(len, refs)):,} answer positions (end-of-turn tokens included)",
        f"- command: `{' '.join(sys.argv)}`",
    ]
    publish(lines, args.out / "gptq_fidelity.md")


if __name__ == "__main__":
    main()
