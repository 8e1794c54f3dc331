"""Paged attention plugged into transformers' attention interface.

The model runs on a packed batch (one row holding every sequence's new tokens); each
layer's attention writes the new K/V into our block-laid cache, then attends each sequence
over its own block table. The step's layout travels in the `inferq_step` kwarg.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTN_IMPLEMENTATION = "inferq_paged"


@dataclass
class PagedKV:
    """Per-layer K/V storage: [layers, blocks * block_size, kv_heads, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    block_size: int

    @classmethod
    def allocate(
        cls,
        layers: int,
        blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> PagedKV:
        shape = (layers, blocks * block_size, kv_heads, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            block_size,
        )


@dataclass
class Segment:
    """One prefilling sequence: `length` new tokens at [start, start+length) of the packed row,
    attending to `context` tokens (cached prefix + new) at slots `slots`."""

    start: int
    length: int
    slots: torch.Tensor  # [context] flat cache slots, in position order


@dataclass
class StepLayout:
    kv: PagedKV
    write_slots: torch.Tensor  # [T] where each new token's K/V goes
    prefills: list[Segment]
    decode_start: int  # decode tokens occupy [decode_start, T) of the packed row
    decode_slots: torch.Tensor | None  # [D, max_context] slots (padding repeats slot 0)
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_context] True where a key is real


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[..., kv_heads, head_dim] rows of one layer's cache, heads moved before tokens."""
    return cache[slots].movedim(-2, -3)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the paged cache; query/key/value are [1, heads, T, head_dim]."""
    step: StepLayout = kwargs["inferq_step"]
    layer = module.layer_idx
    k_cache, v_cache = step.kv.k[layer], step.kv.v[layer]
    k_cache[step.write_slots] = key[0].transpose(0, 1)
    v_cache[step.write_slots] = value[0].transpose(0, 1)
    q = query[0]  # [heads, T, d]
    out = torch.empty_like(q)
    for seg in step.prefills:
        span = slice(seg.start, seg.start + seg.length)
        context = len(seg.slots)
        keys, values = _gather(k_cache, seg.slots), _gather(v_cache, seg.slots)
        if context == seg.length:
            mask, causal = None, True
        else:  # cached prefix: query i sits at position context - length + i
            rows = torch.arange(seg.length, device=q.device)[:, None] + (context - seg.length)
            mask, causal = torch.arange(context, device=q.device)[None, :] <= rows, False
        out[:, span] = F.scaled_dot_product_attention(
            q[:, span],
            keys,
            values,
            attn_mask=mask,
            is_causal=causal,
            scale=scaling,
            enable_gqa=True,
        )
    if step.decode_slots is not None:
        keys, values = _gather(k_cache, step.decode_slots), _gather(v_cache, step.decode_slots)
        dq = q[:, step.decode_start :].transpose(0, 1)[:, :, None]  # [D, heads, 1, d]
        dec = F.scaled_dot_product_attention(
            dq, keys, values, attn_mask=step.decode_mask, scale=scaling, enable_gqa=True
        )
        out[:, step.decode_start :] = dec[:, :, 0].transpose(0, 1)
    return out.transpose(0, 1)[None], None


def _no_mask(*args, **kwargs) -> None:
    """The paged attention builds its own masks from the step layout."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
