"""Memory arithmetic of a paged engine: how many KV blocks and how large a step a model gets
from a KV memory setting in GiB (`EngineConfig.kv_cache_gib`, like vLLM's
`--kv-cache-memory`) and the memory free on its device, instead of token counts tuned for one
model; how a worker splits its KV memory between the models it serves; whether a model fits
at all (`inferq model add`).

Pure arithmetic over a model's config (a transformers config object or its config.json as a
dict) plus one probe of free memory; no model is loaded here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferq.params import EngineConfig

GIB = 1 << 30
HEADROOM = 0.9  # of the free memory an engine may plan with; the rest stays with the OS
ACT_SAFETY = 2  # the activation estimate counts the tensors a layer holds at once, twice
ACT_SHARE = 0.25  # a step's activations may take at most this share of the free memory
MIN_STEP_TOKENS = 16  # the smallest step budget (Settings.max_step_tokens' lower bound)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class InsufficientMemoryError(MemoryError):
    """A model whose weights, one step's activations and its smallest KV cache do not fit."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that its KV cache and step activations follow from."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_context: int

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        """From a transformers config or a config.json dict."""

        def get(name: str, default: Any = None) -> Any:
            if isinstance(config, dict):
                return config.get(name, default)
            return getattr(config, name, default)

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            hidden=hidden,
            intermediate=int(get("intermediate_size") or 4 * hidden),
            vocab=int(get("vocab_size")),
            max_context=int(get("max_position_embeddings") or 2048),
        )

    @classmethod
    def read(cls, path: str | Path) -> ModelShape:
        return cls.of(json.loads((Path(path) / "config.json").read_text()))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token over every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def act_bytes_per_token(self, dtype_bytes: int) -> int:
        """What one token of a step holds in one layer at once (hidden states and residual,
        q/k/v, the attention output, the MLP's gate, up and activation), with a margin."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        held = 4 * self.hidden + 2 * q + 2 * kv + 3 * self.intermediate
        return ACT_SAFETY * held * dtype_bytes


@dataclass(frozen=True)
class KVPlan:
    """What an engine allocates: `blocks` KV blocks and a step budget of `step_tokens`."""

    blocks: int
    block_size: int
    block_bytes: int
    step_tokens: int
    requested_blocks: int  # before the free-memory cap
    free_bytes: int | None  # the free memory planned with (None: not probed)

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def gib(self) -> float:
        return self.blocks * self.block_bytes / GIB

    @property
    def capped(self) -> bool:
        """Free memory, not the setting, limited the KV cache."""
        return self.blocks < self.requested_blocks

    def figures(self) -> dict[str, Any]:
        """For the worker's start log."""
        return {
            "kv_blocks": self.blocks,
            "kv_tokens": self.tokens,
            "kv_gib": round(self.gib, 3),
            "kv_block_bytes": self.block_bytes,
            "step_tokens": self.step_tokens,
            "capped_by_free_memory": self.capped,
        }


def plan_kv(
    shape: ModelShape, dtype_bytes: int, config: EngineConfig, free_bytes: int | None
) -> KVPlan:
    """KV blocks and step budget of one engine.

    Blocks: `config.kv_cache_tokens` when set, else `config.kv_cache_gib` over the bytes of a
    block (layers x KV heads x head dim x 2 x dtype x block size). With `free_bytes` (free
    memory after the weights loaded), a step's activations come first (at most `ACT_SHARE` of
    it, shrinking the step budget), and the KV cache gets at most what remains of `HEADROOM`
    of it. The step budget never exceeds the KV capacity. InsufficientMemoryError when not
    even the smallest cache fits: one prefill chunk (or one step, or one context, if shorter).
    """
    bs = config.block_size
    block_bytes = bs * shape.kv_bytes_per_token(dtype_bytes)
    if config.kv_cache_tokens is not None:
        requested = -(-config.kv_cache_tokens // bs)
    else:
        requested = int(config.kv_cache_gib * GIB // block_bytes)
    step = config.max_step_tokens
    blocks = requested
    if free_bytes is not None:
        act_per_token = shape.act_bytes_per_token(dtype_bytes)
        step = min(step, int(free_bytes * ACT_SHARE // act_per_token))
        step = max(step, MIN_STEP_TOKENS)
        kv_room = free_bytes * HEADROOM - step * act_per_token - logits_bytes(shape, config)
        blocks = min(requested, max(int(kv_room // block_bytes), 0))
    chunk = min(shape.max_context, config.prefill_chunk_tokens, step)
    least = -(-chunk // bs)
    if blocks < least:
        need = least * block_bytes / GIB
        where = f"{free_bytes / GIB:.2f} GiB free" if free_bytes is not None else "the setting"
        raise InsufficientMemoryError(
            f"the KV cache gets {blocks} blocks of {block_bytes} bytes, fewer than the "
            f"{least} ({need:.3f} GiB) one prefill chunk of {chunk} tokens needs "
            f"({where}; INFERQ_KV_CACHE_GIB {config.kv_cache_gib})"
        )
    return KVPlan(blocks, bs, block_bytes, min(step, blocks * bs), requested, free_bytes)


def logits_bytes(shape: ModelShape, config: EngineConfig) -> int:
    """A step's fp32 logits: one row per sampled sequence at most."""
    return config.max_num_seqs * shape.vocab * 4


def split_kv(total_gib: float, per_token: dict[str, int]) -> dict[str, float]:
    """A worker's KV memory split between its models in proportion to their KV bytes per
    token, so that each holds the same number of tokens."""
    whole = sum(per_token.values())
    return {name: total_gib * b / whole for name, b in per_token.items()}


def free_memory(device_type: str) -> int:
    """Bytes free on the device now: CUDA's free memory, or the host's MemAvailable."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def weights_bytes(path: str | Path, dtype_bytes: int, quantized: bool) -> int:
    """The weights' size once loaded: the checkpoint files' size, scaled to `dtype_bytes`
    for a dense checkpoint saved in another precision (a GPTQ one loads as stored)."""
    root = Path(path)
    files = list(root.glob("*.safetensors")) or list(root.glob("*.bin"))
    stored = sum(f.stat().st_size for f in files)
    if quantized:
        return stored
    config = json.loads((root / "config.json").read_text())
    saved = DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 4)
    return math.ceil(stored * dtype_bytes / saved)


def load_dtype(path: str | Path, device: str, dtype: str) -> tuple[Any, bool]:
    """The torch dtype a model directory loads in (its KV cache's too), and whether it is a
    GPTQ checkpoint: as `loading.load_causal_lm` picks them."""
    from worker.engine.loading import gptq_dtype, is_gptq_dir, pick_device, pick_dtype

    where, quantized = pick_device(device), is_gptq_dir(path)
    return (gptq_dtype(dtype, where) if quantized else pick_dtype(dtype, where)), quantized


def kv_shares(total_gib: float, paths: dict[str, str], device: str, dtype: str) -> dict[str, float]:
    """A worker's `total_gib` of KV memory split between the models at `paths` (name -> local
    directory) so that each holds the same number of tokens (`split_kv`)."""
    per_token = {
        name: ModelShape.read(path).kv_bytes_per_token(load_dtype(path, device, dtype)[0].itemsize)
        for name, path in paths.items()
    }
    return split_kv(total_gib, per_token)
