"""The transformers decoder families this engine is tested on (tests/engine/test_families.py:
token-exact against transformers' greedy `generate`), and the check that refuses any other at
load: an untested family might pass attention options the paged attention does not know of
(attention sinks, chunked or bidirectional masks) and run silently wrong."""

from __future__ import annotations

from typing import Any

#: config.model_type -> what the tests cover beyond a Llama layer
FAMILIES: dict[str, str] = {
    "llama": "Llama 2/3, incl. Llama 3.1 rope scaling",
    "mistral": "sliding window",
    "qwen2": "q/k/v biases",
    "qwen3": "q/k norms",
    "gemma": "scaled embeddings, 1 + w norms, GeLU",
    "gemma2": "sliding/global layers, attention and final logit soft-capping",
    "gemma3_text": "sliding/global layers, q/k norms, local rope",
    "phi3": "fused qkv and gate_up",
    "olmo2": "norms after attention and MLP, q/k norms",
    "granite": "embedding, residual, attention and logit multipliers",
    "stablelm": "LayerNorm, partial rotary",
}


class UnsupportedModelError(ValueError):
    """A model whose family the engine is not tested on."""


def check_supported(config: Any) -> None:
    """Raise UnsupportedModelError naming the architecture unless `config` is of a tested
    family."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return
    names = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
    raise UnsupportedModelError(
        f"model type {model_type!r} ({names}) is not a family this engine is tested on, so it "
        f"is refused rather than risk wrong output; tested: {', '.join(sorted(FAMILIES))}"
    )


def attention_softcap(config: Any) -> bool:
    """Whether the model soft-caps attention logits (the C attention kernel does not)."""
    return bool(getattr(config, "attn_logit_softcapping", None))
