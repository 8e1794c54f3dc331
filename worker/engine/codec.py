"""Text <-> token ids for one model: the tokenizer plus the model's end-of-sequence ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend


class TextCodec:
    """The tokenizer plus the model's end-of-sequence ids (implements `api.Codec`).
    Not thread-safe: each thread owns its own (`PagedEngine.new_codec`)."""

    def __init__(self, tokenizer: Any, generation_config: GenerationConfig) -> None:
        self.tokenizer = tokenizer
        eos = generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids: set[int] = {i for i in eos_ids if i is not None}
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.eos_ids)
        self._backend = _same_text_backend(tokenizer)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> TextCodec:
        """Load the tokenizer and generation config of a model directory (or hub id)."""
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the model config's defaults
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
        return cls(AutoTokenizer.from_pretrained(path), generation)

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages rendered with the chat template."""
        if messages is not None:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            return list(encoded.get("input_ids", encoded))
        return list(self.tokenizer(prompt or "")["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=True)
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _same_text_backend(tokenizer: Any) -> Any | None:
    """The Rust tokenizer under a transformers tokenizer whose `decode` adds nothing to it (a
    fast tokenizer of no class with a decode of its own, not cleaning up spaces), else None.
    Its decode gives the same text at about a fifth of the cost per call, which counts: the
    incremental detokenizer calls it twice for every token of a streamed or stopping
    sequence (tests/engine/test_codec.py holds the two equal)."""
    kind = type(tokenizer)
    same = (
        isinstance(tokenizer, TokenizersBackend)
        and kind.decode is PreTrainedTokenizerBase.decode
        and kind._decode is TokenizersBackend._decode
        and not tokenizer.clean_up_tokenization_spaces
    )
    return tokenizer.backend_tokenizer if same else None
