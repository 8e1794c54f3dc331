"""Paged attention plugged into transformers' attention interface.

The model runs on a packed batch (one row holding every sequence's new tokens); each
layer's attention writes the new K/V into our block-laid cache, then attends each sequence
over its own block table. The step's layout travels in the `inferq_step` kwarg.

The cache is head-major ([kv_heads, slots, head_dim] per layer) and is read with
`index_select` on its flat [kv_heads * slots, head_dim] view: the runner turns slots into
such *rows* once per step, every layer reuses them, and gathered keys come out already in
the [kv_heads, tokens, head_dim] layout the matmuls and SDPA consume (no copies).
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
    """Per-layer K/V storage, head-major: [layers, kv_heads, blocks * block_size, head_dim]."""

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
        shape = (layers, kv_heads, blocks * block_size, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            block_size,
        )

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """[kv_heads, *slots.shape]: where `slots` sit, per kv head, in a flat layer view."""
        kv_heads, num_slots = self.k.shape[1], self.k.shape[2]
        heads = torch.arange(kv_heads, device=slots.device) * num_slots
        return slots[None] + heads.view(-1, *([1] * slots.dim()))


@dataclass
class Segment:
    """One prefilling sequence: `length` new tokens at [start, start+length) of the packed row,
    attending to `context` tokens (cached prefix + new) at cache rows `rows`."""

    start: int
    length: int
    rows: torch.Tensor  # [kv_heads, context] cache rows, in position order
    mask: torch.Tensor | None  # [length, context] with a cached prefix; None: plain causal


@dataclass
class DecodeGroup:
    """Decoding sequences that share their first `prefix` blocks (a cached system prompt):
    the shared keys are read once for the group, each sequence gathers only its own suffix."""

    start: int  # the group's tokens are [start, start + count) of the packed row
    count: int
    prefix_rows: torch.Tensor | None  # [kv_heads, P] rows shared by every sequence
    suffix_rows: torch.Tensor  # [kv_heads, count, S] each sequence's remaining rows (padded)
    suffix_pad: torch.Tensor | None  # [1, count, 1, S] True at padding; None if there is none


@dataclass
class StepLayout:
    kv: PagedKV
    write_rows: torch.Tensor  # [kv_heads, T] where each new token's K/V goes
    prefills: list[Segment]
    decodes: list[DecodeGroup]


def _gather(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[*rows.shape, head_dim] rows of a flat [kv_heads * slots, head_dim] layer cache.

    `index_select` copies whole rows; advanced indexing (`cache[rows]`) goes element by
    element and is several times slower on CPU."""
    return cache.index_select(0, rows.flatten()).view(*rows.shape, cache.shape[-1])


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the paged cache; query/key/value are [1, heads, T, head_dim]."""
    step: StepLayout = kwargs["inferq_step"]
    dim = query.shape[-1]
    k_cache = step.kv.k[module.layer_idx].view(-1, dim)
    v_cache = step.kv.v[module.layer_idx].view(-1, dim)
    write = step.write_rows.flatten()
    k_cache.index_copy_(0, write, key[0].reshape(-1, dim))
    v_cache.index_copy_(0, write, value[0].reshape(-1, dim))
    q = query[0]  # [heads, T, d]
    out = torch.empty_like(q)
    for seg in step.prefills:
        span = slice(seg.start, seg.start + seg.length)
        out[:, span] = F.scaled_dot_product_attention(
            q[None, :, span],  # 4-D inputs take the fused CPU kernel; 3-D ones do not
            _gather(k_cache, seg.rows)[None],
            _gather(v_cache, seg.rows)[None],
            attn_mask=seg.mask,
            is_causal=seg.mask is None,
            scale=scaling,
            enable_gqa=True,
        )[0]
    for group in step.decodes:
        rows = slice(group.start, group.start + group.count)
        out[:, rows] = _decode_group(q[:, rows], k_cache, v_cache, group, scaling or dim**-0.5)
    return out.transpose(0, 1)[None], None


def _decode_group(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup, scale: float
) -> torch.Tensor:
    """One query token per sequence, q [heads, n, d]: softmax over shared-prefix and
    own-suffix keys together, the prefix scored with one matmul for the whole group."""
    heads, n, dim = q.shape
    kv_heads = group.suffix_rows.shape[0]
    g = heads // kv_heads
    qg = q.reshape(kv_heads, g, n, dim).transpose(1, 2)  # [kv, n, g, d] query heads per kv head
    ks, vs = _gather(k_cache, group.suffix_rows), _gather(v_cache, group.suffix_rows)
    scores = torch.matmul(qg, ks.transpose(-1, -2)) * scale  # [kv, n, g, S]
    if group.suffix_pad is not None:
        scores.masked_fill_(group.suffix_pad, float("-inf"))
    if group.prefix_rows is None:
        out = torch.matmul(scores.softmax(-1), vs)
    else:
        kp, vp = _gather(k_cache, group.prefix_rows), _gather(v_cache, group.prefix_rows)
        prefix = kp.shape[1]  # kp, vp: [kv, P, d]
        shared = torch.bmm(qg.reshape(kv_heads, n * g, dim), kp.transpose(1, 2)) * scale
        probs = torch.cat([shared.view(kv_heads, n, g, prefix), scores], dim=-1).softmax(-1)
        out = torch.matmul(probs[..., prefix:], vs)  # [kv, n, g, d]
        pp = probs[..., :prefix].reshape(kv_heads, n * g, prefix)
        out += torch.bmm(pp, vp).view(kv_heads, n, g, dim)
    return out.transpose(1, 2).reshape(heads, n, dim)


def _no_mask(*args, **kwargs) -> None:
    """The paged attention builds its own masks from the step layout."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
