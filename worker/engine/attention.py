"""Paged attention plugged into transformers' attention interface.

The model runs on a packed batch (one row holding every sequence's new tokens); each
layer's attention writes the new K/V into our block-laid cache, then attends each sequence
over its own block table. The step's layout is set around the forward (`stepping`), not passed
as a kwarg: not every family's layers forward their kwargs to the attention. A layer's
sliding window and logit soft-capping (the `sliding_window` and `softcap` kwargs of Mistral,
Qwen2, Gemma 2/3 attention) are honoured on both paths, except soft-capping on the C kernel,
which refuses it (the runner takes the torch path for such models).

The cache is head-major ([kv_heads, slots, head_dim] per layer, a block = block_size
adjacent slots). New K/V are written per token into its *slot row* of the flat
[kv_heads * slots, head_dim] view; reads gather whole *block rows* of the
[kv_heads * blocks, block_size * head_dim] view with `index_select` (one index per 16 tokens,
2x faster than per-token rows in bf16). The runner builds both once per step, every layer
reuses them, and gathered keys come out in the [kv_heads, tokens, head_dim] layout the
matmuls and SDPA consume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from worker.engine import native

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

    def slot_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """[kv_heads, *slots.shape]: rows of `slots`, per kv head, in the flat slot view."""
        return _per_head(slots, self.k.shape[1], self.k.shape[2])

    def block_rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """[kv_heads, *blocks.shape]: rows of `blocks`, per kv head, in the flat block view."""
        return _per_head(blocks, self.k.shape[1], self.k.shape[2] // self.block_size)


def _per_head(index: torch.Tensor, kv_heads: int, per_head: int) -> torch.Tensor:
    heads = torch.arange(kv_heads, device=index.device) * per_head
    return index[None] + heads.view(-1, *([1] * index.dim()))


@dataclass
class Segment:
    """One prefilling sequence: `length` new tokens at [start, start+length) of the packed row,
    attending to `context` tokens (cached prefix + new) held by the blocks at `rows`."""

    start: int
    length: int
    context: int
    rows: torch.Tensor  # [kv_heads, blocks] block rows, in position order


@dataclass
class DecodeGroup:
    """Decoding sequences that share their first `prefix` blocks (a cached system prompt):
    the shared keys are read once for the group, each sequence gathers only its own suffix."""

    start: int  # the group's tokens are [start, start + count) of the packed row
    count: int
    prefix_rows: torch.Tensor | None  # [kv_heads, P blocks] block rows shared by every sequence
    suffix_rows: torch.Tensor  # [kv_heads, count, S blocks] each one's remaining blocks (padded)
    suffix_pad: torch.Tensor  # [1, count, 1, S * block_size] True past a sequence's end
    positions: torch.Tensor  # [count] each sequence's position (of its query token)


@dataclass
class StepLayout:
    kv: PagedKV
    write_rows: torch.Tensor  # [kv_heads, T] slot rows where each new token's K/V goes
    prefills: list[Segment]  # empty when the C kernel runs the step
    decodes: list[DecodeGroup]
    tokens: native.TokenTables | None = None  # set when the C kernel runs the step
    _windowed: dict[int, native.TokenTables] = field(default_factory=dict)

    def tables(self, window: int | None) -> native.TokenTables:
        """The C kernel's tables for a layer with this sliding window (None: full)."""
        assert self.tokens is not None
        if not window:
            return self.tokens
        if window not in self._windowed:
            self._windowed[window] = self.tokens.windowed(window)
        return self._windowed[window]


_STEP: ContextVar[StepLayout | None] = ContextVar("inferq_step", default=None)


@contextmanager
def stepping(layout: StepLayout) -> Iterator[None]:
    """Run the model's forward for the step `layout` (its paged attention reads it)."""
    token = _STEP.set(layout)
    try:
        yield
    finally:
        _STEP.reset(token)


def _gather(blocks: torch.Tensor, rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[*rows.shape[:-1], rows.shape[-1] * block_size, head_dim]: the tokens of the block rows
    `rows` of a flat [kv_heads * blocks, block_size * head_dim] layer cache.

    `index_select` copies whole rows; advanced indexing (`cache[rows]`) goes element by
    element and is several times slower on CPU."""
    out = blocks.index_select(0, rows.flatten())
    return out.view(*rows.shape[:-1], rows.shape[-1] * (blocks.shape[-1] // head_dim), head_dim)


def paged_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """Attention over the paged cache; query/key/value are [1, heads, T, head_dim]. A query
    at position p sees keys (p - sliding_window, p] when the layer has a window; scores are
    soft-capped (softcap * tanh(score / softcap)) when the layer caps them."""
    step = _STEP.get()
    if step is None:
        raise RuntimeError("paged attention outside a step: run the model inside `stepping`")
    dim, block = query.shape[-1], step.kv.block_size
    k_cache, v_cache = step.kv.k[module.layer_idx], step.kv.v[module.layer_idx]
    write = step.write_rows.flatten()
    k_cache.view(-1, dim).index_copy_(0, write, key[0].reshape(-1, dim))
    v_cache.view(-1, dim).index_copy_(0, write, value[0].reshape(-1, dim))
    scale = scaling or dim**-0.5
    if step.tokens is not None:
        if softcap:
            raise ValueError("the C attention kernel has no logit soft-capping: use the torch path")
        q = query[0].transpose(0, 1)  # [T, heads, d]
        tables = step.tables(sliding_window)
        out = native.paged_attention(q, k_cache, v_cache, tables, block, scale)
        return out[None], None
    k_cache, v_cache = k_cache.view(-1, block * dim), v_cache.view(-1, block * dim)
    q = query[0]  # [heads, T, d]
    out = torch.empty_like(q)
    plain = not sliding_window and not softcap
    for seg in step.prefills:
        span = slice(seg.start, seg.start + seg.length)
        keys = _gather(k_cache, seg.rows, dim)[:, : seg.context]
        values = _gather(v_cache, seg.rows, dim)[:, : seg.context]
        if plain and _fused_prefill_pays(q):
            out[:, span] = _prefill_fused(q[:, span], keys, values, scale)
        else:
            out[:, span] = _prefill_matmul(q[:, span], keys, values, scale, sliding_window, softcap)
    for group in step.decodes:
        rows = slice(group.start, group.start + group.count)
        out[:, rows] = _decode_group(
            q[:, rows], k_cache, v_cache, group, scale, sliding_window, softcap
        )
    return out.transpose(0, 1)[None], None


def _fused_prefill_pays(q: torch.Tensor) -> bool:
    """The fused SDPA kernel wins in fp32 and on GPUs; on CPU in bf16/fp16 it runs 2-3x slower
    than two batched matmuls (measured on prompt segments of 10-120 tokens)."""
    return q.dtype == torch.float32 or q.device.type != "cpu"


def _prefill_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [heads, L, d] over k, v [kv_heads, C, d]: the last L keys are the segment's own
    (causal), the C - L before them a cached prefix every query sees."""
    length, context = q.shape[1], k.shape[1]
    mask = None  # no cached prefix: plain causal
    if context > length:  # query i sits at position context - length + i
        keys = torch.arange(context, device=q.device)[None, :]
        mask = keys <= torch.arange(length, device=q.device)[:, None] + (context - length)
    return F.scaled_dot_product_attention(
        q[None],  # 4-D inputs take the fused CPU kernel; 3-D ones do not
        k[None],
        v[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )[0]


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def _out_of_window(keys: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """[len(positions), len(keys)]: True where key position is at or before position - window."""
    return keys[None, :] <= positions[:, None] - window


def _prefill_matmul(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`_prefill_fused` as two batched matmuls (like HF's eager attention; the softmax
    accumulates in fp32). The last L keys are the segment's own: causal among themselves,
    every earlier (cached) key is visible to every query (unless out of its window), so
    without a window only that square is masked."""
    heads, length, dim = q.shape
    kv_heads, context = k.shape[0], k.shape[1]
    g = heads // kv_heads  # query heads per kv head, adjacent in head order
    if softcap:  # scaled after the product, then capped, as transformers' eager attention
        scores = torch.bmm(q.reshape(kv_heads, g * length, dim), k.transpose(1, 2)) * scale
    else:
        scores = torch.bmm((q * scale).reshape(kv_heads, g * length, dim), k.transpose(1, 2))
    scores = _capped(scores.view(kv_heads, g, length, context), softcap)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores[..., context - length :].masked_fill_(future, float("-inf"))
    if window:
        keys = torch.arange(context, device=q.device)
        scores.masked_fill_(_out_of_window(keys, keys[context - length :], window), float("-inf"))
    probs = scores.softmax(-1).view(kv_heads, g * length, context)
    return torch.bmm(probs, v).view(heads, length, dim)


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence, q [heads, n, d]: softmax over shared-prefix and
    own-suffix keys together, the prefix scored with one matmul for the whole group."""
    heads, n, dim = q.shape
    kv_heads = group.suffix_rows.shape[0]
    g = heads // kv_heads
    qg = q.reshape(kv_heads, g, n, dim).transpose(1, 2)  # [kv, n, g, d] query heads per kv head
    ks, vs = _gather(k_cache, group.suffix_rows, dim), _gather(v_cache, group.suffix_rows, dim)
    scores = _capped(torch.matmul(qg, ks.transpose(-1, -2)) * scale, softcap)  # [kv, n, g, S]
    scores.masked_fill_(group.suffix_pad, float("-inf"))
    blocks = 0 if group.prefix_rows is None else group.prefix_rows.shape[-1]
    prefix = blocks * (k_cache.shape[-1] // dim)  # shared keys, before each one's own
    if window:
        keys = torch.arange(prefix, prefix + ks.shape[-2], device=q.device)
        scores.masked_fill_(_out_of_window(keys, group.positions, window)[:, None], float("-inf"))
    if group.prefix_rows is None:
        out = torch.matmul(scores.softmax(-1), vs)
    else:
        kp = _gather(k_cache, group.prefix_rows, dim)
        vp = _gather(v_cache, group.prefix_rows, dim)
        shared = torch.bmm(qg.reshape(kv_heads, n * g, dim), kp.transpose(1, 2)) * scale
        shared = _capped(shared.view(kv_heads, n, g, prefix), softcap)
        if window:
            keys = torch.arange(prefix, device=q.device)
            hidden = _out_of_window(keys, group.positions, window)[:, None]
            shared = shared.masked_fill(hidden, float("-inf"))
        probs = torch.cat([shared, scores], dim=-1).softmax(-1)
        out = torch.matmul(probs[..., prefix:], vs)  # [kv, n, g, d]
        pp = probs[..., :prefix].reshape(kv_heads, n * g, prefix)
        out += torch.bmm(pp, vp).view(kv_heads, n, g, dim)
    return out.transpose(1, 2).reshape(heads, n, dim)


def _no_mask(*args, **kwargs) -> None:
    """The paged attention builds its own masks from the step layout."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
