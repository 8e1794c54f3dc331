"""`TextCodec.decode` calls the Rust tokenizer directly where transformers' decode adds nothing
to it (the default model's tokenizer, and the tiny models' word-level one): the same text as
`tokenizer.decode(..., skip_special_tokens=True)` on random ids (special tokens, bytes that
are not whole characters, pieces of one), and the transformers path where it cleans up spaces."""

from __future__ import annotations

import random
from pathlib import Path

from tiny_models import build
from transformers import AutoTokenizer, GenerationConfig

from worker.engine.codec import TextCodec


def _ids(vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randrange(1, 24))]


def _same_text(codec: TextCodec, cases: int = 2000) -> None:
    tokenizer, rng = codec.tokenizer, random.Random(7)
    special = sorted(tokenizer.all_special_ids)
    for _ in range(cases):
        ids = _ids(len(tokenizer), rng)
        ids[rng.randrange(len(ids))] = rng.choice(special)  # skipped by both
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        assert codec.decode(ids) == expected, ids


def test_default_model_decodes_through_the_rust_tokenizer(model_path: str) -> None:
    codec = TextCodec.from_model_dir(model_path)
    assert codec._backend is codec.tokenizer.backend_tokenizer
    _same_text(codec)
    text = "Grüße, 東京! Ünïcödé 🙂 and  two  spaces ."
    ids = codec.tokenizer(text)["input_ids"]
    assert codec.decode(ids) == text
    pieces = "".join(codec.decode(ids[i : i + 1]) for i in range(len(ids)))
    assert "\ufffd" in pieces  # single tokens carry parts of characters


def test_tiny_models_word_level_tokenizer(tmp_path: Path) -> None:
    codec = TextCodec.from_model_dir(build("llama", tmp_path))
    assert codec._backend is not None
    _same_text(codec, cases=500)


def test_cleaning_up_spaces_keeps_transformers_decode(model_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path, clean_up_tokenization_spaces=True)
    codec = TextCodec(tokenizer, GenerationConfig(eos_token_id=tokenizer.eos_token_id))
    assert codec._backend is None
    ids = tokenizer("a , b .")["input_ids"]
    assert codec.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
