"""The KV memory arithmetic (worker/engine/memory.py): blocks from a GiB setting and a
model's shape, the free-memory cap, the step budget, the refusal, and a worker's split."""

from __future__ import annotations

import pytest

from inferq.params import EngineConfig
from inferq.settings import Settings
from worker.engine.memory import (
    GIB,
    HEADROOM,
    InsufficientMemoryError,
    ModelShape,
    plan_kv,
    split_kv,
)

# SmolLM2-135M, the default model's shape (its config.json)
SMOL = ModelShape.of(
    {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
    }
)
# Llama 3.1 8B's shape
LLAMA8B = ModelShape.of(
    {
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    }
)


def test_bytes_per_token_and_block_follow_the_shape() -> None:
    assert SMOL.head_dim == 64
    assert SMOL.kv_bytes_per_token(4) == 2 * 30 * 3 * 64 * 4 == 46080  # "46 KB per token"
    assert SMOL.kv_bytes_per_token(2) == 23040
    assert LLAMA8B.kv_bytes_per_token(2) == 131072  # 128 KiB per token in bf16
    plan = plan_kv(SMOL, 2, EngineConfig(kv_cache_gib=1.0), None)
    assert plan.block_bytes == 16 * 23040
    assert plan.blocks == GIB // (16 * 23040) == 2912


def test_the_default_model_keeps_about_the_capacity_it_had() -> None:
    """Before: 32768 tokens = 2048 blocks whatever the model; now 0.75 GiB: the GPTQ default
    (bf16 KV) gets 2184 blocks, the fp32 model half as many."""
    default = plan_kv(SMOL, 2, EngineConfig(), None)
    assert (default.blocks, default.tokens) == (2184, 34944)
    assert plan_kv(SMOL, 4, EngineConfig(), None).blocks == 1092
    assert default.step_tokens == EngineConfig().max_step_tokens == 2048


def test_a_bigger_model_gets_fewer_blocks_from_the_same_memory() -> None:
    small = plan_kv(SMOL, 2, EngineConfig(kv_cache_gib=4), None)
    big = plan_kv(LLAMA8B, 2, EngineConfig(kv_cache_gib=4), None)
    assert big.blocks == 4 * GIB // (16 * 131072) == 2048
    assert small.blocks * small.block_bytes <= 4 * GIB < (small.blocks + 1) * small.block_bytes
    assert big.blocks < small.blocks


def test_kv_cache_tokens_fixes_the_capacity_instead() -> None:
    plan = plan_kv(SMOL, 4, EngineConfig(kv_cache_tokens=1000, kv_cache_gib=100), None)
    assert (plan.blocks, plan.tokens) == (63, 1008)


def test_free_memory_caps_the_cache_and_then_the_step_budget() -> None:
    cfg = EngineConfig(kv_cache_gib=8)
    roomy = plan_kv(LLAMA8B, 2, cfg, 64 * GIB)
    assert not roomy.capped and roomy.blocks == 4096 and roomy.step_tokens == 2048
    tight = plan_kv(LLAMA8B, 2, cfg, 4 * GIB)  # 4 GiB free after the weights
    act = LLAMA8B.act_bytes_per_token(2)
    assert tight.capped and tight.blocks < 4096
    logits = cfg.max_num_seqs * LLAMA8B.vocab * 4
    room = 4 * GIB * HEADROOM - tight.step_tokens * act - logits
    assert tight.blocks == int(room // tight.block_bytes)
    assert tight.step_tokens == 2048  # a quarter of 4 GiB holds a 2048-token step
    tighter = plan_kv(LLAMA8B, 2, cfg, GIB // 2)
    assert tighter.step_tokens == int(GIB // 2 * 0.25 // act) < 2048  # activations shrink it
    assert tighter.step_tokens <= tighter.tokens


def test_the_step_budget_never_exceeds_the_cache() -> None:
    plan = plan_kv(SMOL, 4, EngineConfig(kv_cache_tokens=512, max_step_tokens=2048), None)
    assert plan.step_tokens == 512


def test_too_little_memory_is_refused_with_the_figures() -> None:
    with pytest.raises(InsufficientMemoryError, match=r"gets 0 blocks .* \(0.03 GiB free"):
        plan_kv(LLAMA8B, 2, EngineConfig(kv_cache_gib=8), GIB // 32)  # the logits alone
    with pytest.raises(InsufficientMemoryError, match=r"16 .* chunk of 256 .*_GIB 0.001"):
        plan_kv(LLAMA8B, 2, EngineConfig(kv_cache_gib=0.001), None)


def test_a_worker_splits_its_memory_for_equal_tokens() -> None:
    per_token = {"smol": SMOL.kv_bytes_per_token(2), "llama": LLAMA8B.kv_bytes_per_token(2)}
    shares = split_kv(3.0, per_token)
    assert sum(shares.values()) == pytest.approx(3.0)
    tokens = {n: shares[n] * GIB / b for n, b in per_token.items()}
    assert tokens["smol"] == pytest.approx(tokens["llama"])
    assert split_kv(1.5, {"only": 7}) == {"only": 1.5}


def test_the_setting_reaches_the_engine_config() -> None:
    settings = Settings(kv_cache_gib=2.5)
    assert settings.engine_config().kv_cache_gib == 2.5
    assert settings.engine_config().kv_cache_tokens is None
    assert settings.engine_config(kv_cache_gib=1.25).kv_cache_gib == 1.25
