"""Stop strings on the real tokenizer, tokens fed to an `EngineSequence` through `append`
(no model run): the same tokens and text as decoding the whole output at every token, and a
cost per token that does not grow with the output."""

from __future__ import annotations

import time

import pytest
import torch

from worker.engine.api import EngineOutput, EngineRequest, FinishReason, SamplingParams
from worker.engine.codec import TextCodec
from worker.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, find_stop
from worker.engine.sequence import EngineSequence

pytestmark = pytest.mark.model
TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. Then it sleeps.\nThe end.",
    "cjk": "我们去公园散步吧。今天天气很好。你好世界。",
    "emoji": "Party 🎉🎉 time 😀 and a flag 🏳️‍🌈 plus family 👨‍👩‍👧 done.",
    "mixed": "café naïve — Привет мир ∀x∃y 𝄞 𝄢 こんにちは 😀!",
}


@pytest.fixture(scope="module")
def codec(model_path: str) -> TextCodec:
    return TextCodec.from_model_dir(model_path)


def _sequence(codec: TextCodec, stops: tuple[str, ...], max_tokens: int) -> EngineSequence:
    request = EngineRequest(
        seq_id="s", prompt_ids=[1], params=SamplingParams(max_tokens=max_tokens, stop=stops)
    )
    return EngineSequence.start(request, codec, torch.device("cpu"), salt="", arrival=0.0)


def _generate(codec: TextCodec, ids: list[int], stops: tuple[str, ...]) -> EngineOutput:
    seq = _sequence(codec, stops, len(ids))
    for token in ids:
        if seq.append(token):
            break
    return seq.output()


def _decode_every_token(
    codec: TextCodec, ids: list[int], stops: tuple[str, ...]
) -> tuple[list[int], str, FinishReason]:
    """What the engine did before: decode the whole output at each token, stop at the first
    decode holding a stop string, the text cut before the earliest one."""
    for n in range(1, len(ids) + 1):
        text = codec.decode(ids[:n])
        if (cut := find_stop(text, stops)) is not None:
            return ids[:n], text[:cut], FinishReason.STOP
    return ids, codec.decode(ids), FinishReason.LENGTH


@pytest.mark.parametrize("name", TEXTS)
def test_each_token_adds_the_text_the_whole_decode_has(codec: TextCodec, name: str) -> None:
    ids = codec.encode(TEXTS[name], None)
    if name != "ascii":  # a character split across tokens, held back until complete
        assert any(codec.decode([t]).endswith(REPLACEMENT) for t in ids)
    detokenizer, text = IncrementalDetokenizer(codec.decode), ""
    for n, token in enumerate(ids, 1):
        text += detokenizer.push(token)
        assert text == codec.decode(ids[:n]).rstrip(REPLACEMENT)
    assert text == codec.decode(ids) == TEXTS[name]
    out = _generate(codec, ids, ("zq#never",))
    assert out.finish_reason == FinishReason.LENGTH and out.text == TEXTS[name]


@pytest.mark.parametrize(
    ("name", "stops"),
    [
        ("ascii", ("own fo",)),  # across tokens
        ("ascii", ("The",)),  # the very first token
        ("ascii", ("T",)),  # the first character
        ("ascii", ("lazy", "quick", "\n")),  # several: the first to appear
        ("ascii", ("quick brown fox", "brown")),  # the shorter one appears first
        ("ascii", ("brown", "The quick brown")),  # both at one token: the earliest begins
        ("ascii", ("sleeps.\nThe",)),  # across a newline
        ("cjk", ("世界",)),
        ("cjk", ("天气",)),
        ("emoji", ("😀",)),  # a character split across tokens
        ("emoji", ("🎉 t",)),
        ("emoji", ("👧",)),
        ("mixed", ("мир", "𝄢")),
        ("mixed", ("ち",)),
    ],
)
def test_stops_where_decoding_every_token_stopped(
    codec: TextCodec, name: str, stops: tuple[str, ...]
) -> None:
    ids = codec.encode(TEXTS[name], None)
    expected = _decode_every_token(codec, ids, stops)
    assert expected[2] == FinishReason.STOP  # every case has a stop in its text
    out = _generate(codec, ids, stops)
    assert (out.token_ids, out.text, out.finish_reason) == expected


def test_a_stop_split_across_tokens_and_characters(codec: TextCodec) -> None:
    """The cases above do what they say: "own fo" and the emoji each span tokens."""
    ids = codec.encode(TEXTS["ascii"], None)
    assert not any("own fo" in codec.decode([t]) for t in ids)
    out = _generate(codec, ids, ("own fo",))
    assert out.text == "The quick br" and out.token_ids == ids[: len(out.token_ids)]
    assert len(out.token_ids) == 4  # The, quick, brown, fox
    emoji = codec.encode(TEXTS["emoji"], None)
    out = _generate(codec, emoji, ("😀",))
    assert codec.decode(out.token_ids[-1:]) != "😀" and codec.decode(out.token_ids).endswith("😀")


def _append_seconds(codec: TextCodec, ids: list[int]) -> float:
    """The fastest of five runs of `append` over `ids`, a stop string that never appears."""
    best = float("inf")
    for _ in range(5):
        seq = _sequence(codec, ("zq#never", "\n\n\n"), len(ids))
        start = time.perf_counter()
        for token in ids:
            seq.append(token)
        best = min(best, time.perf_counter() - start)
    assert seq.finish_reason == FinishReason.LENGTH and seq.text is None
    return best


def test_stop_strings_cost_grows_linearly_with_the_output(codec: TextCodec) -> None:
    """4,000 output tokens against 1,000: about 4x; decoding the whole output at every token
    (the engine before) gave about 16x."""
    text = " ".join(f"{TEXTS[k]} {i}" for i in range(200) for k in TEXTS)
    ids = codec.encode(text, None)[:4000]
    assert len(ids) == 4000
    ratio = _append_seconds(codec, ids) / _append_seconds(codec, ids[:1000])
    assert ratio < 8, ratio
