"""Tiny random-weight models of each supported decoder family, built offline from
transformers configs (no download) and saved as Hugging Face directories with a word-level
tokenizer, for token-exact tests of the engine against transformers' own greedy `generate`.

Weights are drawn with a wide initializer and every 1-D parameter (norm weights, biases) is
perturbed, so a norm read as `w` instead of `1 + w`, or a dropped bias, changes the tokens;
embeddings are untied and greedy continuations are diverse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

VOCAB = 512
EOS = 1
WINDOW = 24  # sliding window of the windowed families: shorter than most test prompts
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.08,
    "tie_word_embeddings": False,
    "bos_token_id": 2,
    "eos_token_id": EOS,
    "pad_token_id": 0,
}
ALTERNATING = ["sliding_attention", "full_attention"] * 2
#: a minimal chat template (the word-level tokenizer reads contents as words)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
SEEDS = {"olmo2": 3}  # seed 0 gives OLMo 2 a continuation of only three distinct tokens

#: family -> (config class name, its keyword arguments beyond COMMON)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3.1": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW, "head_dim": 32}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "gemma": ("GemmaConfig", {"head_dim": 32, "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 32,
            "sliding_window": WINDOW,
            "layer_types": ALTERNATING,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": 32,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "head_dim": 32,
            "sliding_window": WINDOW,
            "layer_types": ALTERNATING,
            "query_pre_attn_scalar": 32,
        },
    ),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": (
        "GraniteConfig",
        {
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.05,
            "logits_scaling": 2.0,
        },
    ),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25}),
}


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `VOCAB` tokens `w0`..: the engine's codec needs one; the
    tests feed token ids."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<pad>": 0, "</s>": EOS, "<s>": 2})
    for name in ("w0", "w1", "w2"):
        del vocab[name]
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="<pad>", bos_token="<s>"
    )


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The family's test config; `overrides` (sizes, for benchmarks) replace its values."""
    cls_name, extra = FAMILIES[family]
    cls: Callable[..., transformers.PretrainedConfig] = getattr(transformers, cls_name)
    return cls(**{**COMMON, **extra, **overrides})


def build(family: str, root: Path) -> Path:
    """Save a random-weight `family` model (fp32) with a tokenizer under root/family."""
    path = root / family
    if not (path / "config.json").is_file():
        save(config(family), path, SEEDS.get(family, 0))
    return path


def save(
    cfg: transformers.PretrainedConfig, path: Path, seed: int = 0, *, chat: bool = False
) -> None:
    """A random-weight model of `cfg` (fp32) with a tokenizer (and `CHAT_TEMPLATE` if
    `chat`), saved at `path`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb(model, seed)
    model.generation_config = GenerationConfig(
        eos_token_id=EOS, pad_token_id=0, bos_token_id=2, do_sample=False
    )
    model.save_pretrained(path)
    tokenizer = _tokenizer()
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)


def reference(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy `generate` (eager attention, fp32), one prompt at a time (no
    padding), cut at the end-of-sequence token."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    refs = []
    for ids in prompts:
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False
        )[0, len(ids) :].tolist()
        refs.append(out[: out.index(EOS)] if EOS in out else out)
    return refs


def gptq_source(path: Path, tokenizer_dir: str, *, tied: bool = False) -> Path:
    """A tiny random Llama with the given (real) tokenizer at `path`, for quantization tests:
    hidden 128 (group sizes 32, 64 and 128 all fit), intermediate 256 (two groups of 128: a
    real act-order permutation), wide logits (varied greedy tokens)."""
    if (path / "config.json").is_file():
        return path
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **{
            **COMMON,
            "num_hidden_layers": 2,
            "vocab_size": len(tok),
            "initializer_range": 0.3,
            "tie_word_embeddings": tied,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
