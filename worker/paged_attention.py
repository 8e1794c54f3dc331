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
class DecodeGroup:
    """Decoding sequences that share their first `prefix` blocks (a cached system prompt):
    the shared keys are read once for the group, each sequence gathers only its own suffix."""

    start: int  # the group's tokens are [start, start + count) of the packed row
    count: int
    prefix_slots: torch.Tensor | None  # [P] slots shared by every sequence of the group
    suffix_slots: torch.Tensor  # [count, S] each sequence's remaining slots (padded)
    suffix_mask: torch.Tensor  # [count, S] True where a suffix key is real


@dataclass
class StepLayout:
    kv: PagedKV
    write_slots: torch.Tensor  # [T] where each new token's K/V goes
    prefills: list[Segment]
    decodes: list[DecodeGroup]


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
    for group in step.decodes:
        rows = slice(group.start, group.start + group.count)
        out[:, rows] = _decode_group(
            q[:, rows].transpose(0, 1), k_cache, v_cache, group, scaling or q.shape[-1] ** -0.5
        ).transpose(0, 1)
    return out.transpose(0, 1)[None], None


def _decode_group(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup, scale: float
) -> torch.Tensor:
    """One query token per sequence, q [n, heads, d]: softmax over shared-prefix and
    own-suffix keys together, the prefix scored with one matmul for the whole group."""
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    qg = q.reshape(n, kv_heads, heads // kv_heads, dim)  # query heads grouped per kv head
    ks = k_cache[group.suffix_slots].permute(0, 2, 3, 1)  # [n, kv, d, S]
    vs = v_cache[group.suffix_slots].transpose(1, 2)  # [n, kv, S, d]
    scores = torch.matmul(qg, ks) * scale  # [n, kv, g, S]
    scores = scores.masked_fill(~group.suffix_mask[:, None, None, :], float("-inf"))
    if group.prefix_slots is None:
        return torch.matmul(scores.softmax(-1), vs).reshape(n, heads, dim)
    kp = k_cache[group.prefix_slots].permute(1, 2, 0)  # [kv, d, P]
    vp = v_cache[group.prefix_slots].transpose(0, 1)  # [kv, P, d]
    prefix = kp.shape[-1]
    flat = qg.transpose(0, 1).reshape(kv_heads, -1, dim)  # [kv, n*g, d]
    shared = (torch.bmm(flat, kp) * scale).view(kv_heads, n, -1, prefix).transpose(0, 1)
    probs = torch.cat([shared, scores], dim=-1).softmax(-1)
    out = torch.matmul(probs[..., prefix:], vs)  # [n, kv, g, d]
    pp = probs[..., :prefix].transpose(0, 1).reshape(kv_heads, -1, prefix)
    out += torch.bmm(pp, vp).view(kv_heads, n, -1, dim).transpose(0, 1)
    return out.reshape(n, heads, dim)


def _no_mask(*args, **kwargs) -> None:
    """The paged attention builds its own masks from the step layout."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
