"""The scale-out benchmark's workloads (bench/scale_bench.py): the engine benchmark's jobs,
a skewed variant (half the jobs on one hot system prompt) and a many-prefix variant (each
system prompt in 8 "Desk d of 8." variants)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from engine_bench import build_workload  # bench/, beside this script
from service_bench import RecordingCodec
from transformers import AutoTokenizer

from inferq.settings import FP_MODEL, get_settings
from worker.engine.codec import TextCodec
from worker.prep.models import resolve_model

WORKLOADS = ("bench", "skewed", "many")
DESKS = 8  # the many-prefix workload: each system prompt in 8 variants (32 prefixes)
HOT = 0  # the skewed workload's hot system prompt


@dataclass
class Spec:
    """One job: its system prompt's index, chat messages and max_tokens."""

    system: int
    messages: list[dict[str, str]]
    max_tokens: int


def build_specs(n: int, seed: int, max_new: int) -> tuple[dict[str, list[Spec]], list[int]]:
    """Both workloads, and each system prompt's templated block length."""
    path = resolve_model(get_settings(), FP_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    codec = RecordingCodec(TextCodec.from_model_dir(path))
    jobs, sys_lens = build_workload(tok, codec, n, seed, max_new)
    msgs = [codec.messages[id(j.prompt_ids)] for j in jobs]
    bench = [Spec(j.system, m, j.max_tokens) for j, m in zip(jobs, msgs, strict=True)]
    systems = {s.system: s.messages[0]["content"] for s in bench}
    assert len(systems) == len(sys_lens), "every system prompt must occur in the workload"
    rng = random.Random(seed + 1)
    hot = set(rng.sample(range(n), n // 2))
    cold = [k for k in range(len(sys_lens)) if k != HOT]
    skewed = []
    for i, s in enumerate(bench):
        k = HOT if i in hot else rng.choice(cold)
        system = {"role": "system", "content": systems[k]}
        skewed.append(Spec(k, [system, *s.messages[1:]], s.max_tokens))
    many, variants = [], {}  # (desk, prompt) -> system index, after the 4 originals
    for s in bench:
        text = f"Desk {rng.randrange(DESKS)} of {DESKS}. {systems[s.system]}"
        index = variants.setdefault(text, len(sys_lens) + len(variants))
        many.append(
            Spec(index, [{"role": "system", "content": text}, *s.messages[1:]], s.max_tokens)
        )
    for text in variants:  # in index order
        block = tok.apply_chat_template([{"role": "system", "content": text}])
        sys_lens.append(len(list(block["input_ids"])))
    return {"bench": bench, "skewed": skewed, "many": many}, sys_lens
