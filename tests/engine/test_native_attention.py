"""The C paged-attention kernel against attention computed densely in fp64."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scheduler import PrefillWork, Sequence
from worker.engine import native
from worker.engine.runner import PagedRunner

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


def i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def step(tables, seq_of, ctx_len, tiles=(), key_from=None) -> native.TokenTables:
    """Tiles as (first token, rows, table row, keys)."""
    key_from = key_from or [0] * len(seq_of)
    cols = [i32([t[k] for t in tiles]) for k in range(4)]
    return native.TokenTables(i32(tables), i32(seq_of), i32(ctx_len), i32(key_from), *cols)


def reference(q, k_cache, v_cache, tables, seq_of, ctx_len, block_size, scale, window=None):
    """Each token's keys (its last `window` ones) gathered through its block table, softmax
    in fp64."""
    tokens, heads, dim = q.shape
    g = heads // k_cache.shape[0]
    out = torch.empty(tokens, heads, dim, dtype=torch.float64)
    for t in range(tokens):
        n = int(ctx_len[t])
        lo = max(0, n - window) if window else 0
        slots = [
            int(tables[seq_of[t], p // block_size]) * block_size + p % block_size
            for p in range(lo, n)
        ]
        k = k_cache[:, slots].double().repeat_interleave(g, 0)  # [heads, n, d]
        v = v_cache[:, slots].double().repeat_interleave(g, 0)
        w = (q[t].double()[:, None, :] @ k.transpose(1, 2) * scale).softmax(-1)
        out[t] = (w @ v)[:, 0]
    return out


# a prefill of 5 tokens at positions 80..84 of seq 0 (80 cached), decodes of seqs 1-3 (1 and
# 2 share their first 2 blocks with seq 0), a one-token seq 4; tiles as the runner makes them
TILED = {
    "none": ((), None),
    "prefix and group": (
        [(0, 5, 0, 80), (5, 2, 1, 32)],
        [80] * 5 + [32, 32, 0, 0],
    ),
}


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block"), [(9, 3, 64, 16), (4, 4, 32, 16)])
@pytest.mark.parametrize("tiling", list(TILED))
def test_matches_dense_attention(dtype, tol, heads, kv_heads, dim, block, tiling):
    gen = torch.Generator().manual_seed(0)
    blocks = 40
    k_cache = torch.randn(kv_heads, blocks * block, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, blocks * block, dim, generator=gen).to(dtype)
    # three sequences: a long one, one sharing its first blocks, a one-token one
    tables = [
        [5, 9, 2, 30, 31, 7],
        [5, 9, 11, 12, 0, 0],
        [5, 9, 18, 0, 0, 0],
        [21, 22, 23, 24, 0, 0],
        [17] + [0] * 5,
    ]
    seq_of = [0, 0, 0, 0, 0, 1, 2, 3, 4]
    ctx_len = [81, 82, 83, 84, 85, 50, 40, 63, 1]
    packed = torch.randn(len(seq_of), heads * dim, generator=gen).to(dtype)
    q = packed.view(len(seq_of), heads, dim)
    scale = dim**-0.5
    layout = step(tables, seq_of, ctx_len, *TILED[tiling])
    got = native.paged_attention(q, k_cache, v_cache, layout, block, scale)
    tables, seq_of, ctx_len = layout.tables, layout.seq_of, layout.ctx_len
    want = reference(q, k_cache, v_cache, tables, seq_of, ctx_len, block, scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [1, 7, 24, 100])
def test_a_sliding_window_matches_dense_attention(dtype, tol, window):
    """`TokenTables.windowed`: each token over its last `window` keys only (from inside a
    block, across block boundaries, or all of them), the tiles dropped."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    k_cache, v_cache = torch.randn(2, kv_heads, 16 * 40, dim, generator=gen).to(dtype).unbind(0)
    tables = [[5, 9, 2, 30, 31, 7], [5, 9, 11, 12, 0, 0], [17, 0, 0, 0, 0, 0]]
    seq_of, ctx_len = [0, 0, 0, 1, 2], [81, 82, 83, 50, 1]
    tiled = step(tables, seq_of, ctx_len, [(0, 3, 0, 80)], [80] * 3 + [0, 0])
    layout = tiled.windowed(window)
    q = torch.randn(len(seq_of), heads, dim, generator=gen).to(dtype)
    got = native.paged_attention(
        q, k_cache.contiguous(), v_cache.contiguous(), layout, block, dim**-0.5
    )
    want = reference(
        q, k_cache, v_cache, layout.tables, layout.seq_of, layout.ctx_len, block, dim**-0.5, window
    )
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    tiled.key_lo = layout.key_lo  # a first key per token with tiles: refused, not wrong
    with pytest.raises(ValueError, match="limits"):
        native.paged_attention(q, k_cache.contiguous(), v_cache.contiguous(), tiled, block, 1.0)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_a_wide_tile_matches_dense_attention(dtype, tol, dim):
    """40 decodes sharing 150 keys (9 blocks and part of one) as one tile, each with keys of
    its own after them: many 16-row query blocks, key chunks of all lengths (the AMX path
    where the CPU has one)."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, block, seqs, shared = 9, 3, 16, 40, 150
    k_cache, v_cache = torch.randn(2, kv_heads, 16 * 96, dim, generator=gen).to(dtype).unbind(0)
    tables = [[*range(10), 10 + 2 * s, 11 + 2 * s] for s in range(seqs)]
    ctx_len = [shared + 2 + s % 20 for s in range(seqs)]  # 152-171: into its own blocks
    layout = step(tables, list(range(seqs)), ctx_len, [(0, seqs, 0, shared)], [shared] * seqs)
    q = torch.randn(seqs, heads, dim, generator=gen).to(dtype)
    got = native.paged_attention(
        q, k_cache.contiguous(), v_cache.contiguous(), layout, block, dim**-0.5
    )
    want = reference(
        q, k_cache, v_cache, layout.tables, layout.seq_of, layout.ctx_len, block, dim**-0.5
    )
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_tiles_past_the_row_limit_split():
    """A tile of more than TILE_ROWS tokens is refused by the kernel (the runner splits)."""
    k_cache = v_cache = torch.zeros(1, 64, 32)
    n = native.TILE_ROWS + 1
    layout = step([[0, 1]], [0] * n, [32] * n, [(0, n, 0, 16)], [16] * n)
    with pytest.raises(ValueError, match="limits"):
        native.paged_attention(torch.zeros(n, 1, 32), k_cache, v_cache, layout, 16, 1.0)


def test_strided_queries():
    """Queries laid out [heads, T, d] in memory (a transposed view) give the same result."""
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(2, 2, 64, 32, generator=gen).unbind(0)
    layout = step([[1, 3]], [0, 0, 0], [5, 6, 7], [(0, 3, 0, 4)], [4, 4, 4])
    head_major = torch.randn(4, 3, 32, generator=gen)  # [heads, T, d]
    args = (k_cache, v_cache, layout, 8, 0.25)
    strided = native.paged_attention(head_major.transpose(0, 1), *args)
    dense = native.paged_attention(head_major.transpose(0, 1).contiguous(), *args)
    assert torch.equal(strided, dense)


@pytest.mark.parametrize("start", [0, 40])
def test_the_runners_prefill_tiles_match_dense_attention(start):
    """A 150-token prefill after `start` cached tokens, laid out by the runner: tiles of 64 new
    tokens over every key before them, each token alone over at most 63 more."""
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, dim, block, new = 9, 3, 64, 16, 150
    table = list(range(12))
    ids = list(range(start + new))
    prefill = PrefillWork(Sequence("p", ids, 1), ids[start:], start, table, final=True)
    layout = PagedRunner._token_tables(SimpleNamespace(block_size=block), [prefill], [], [])
    rows = layout.tile_rows.tolist()
    assert rows == [64, 64, 22] if start else rows == [64, 22]  # no tile without keys before
    assert (layout.ctx_len - layout.key_from).max() <= 64 and layout.ctx_len[-1] == start + new
    k_cache, v_cache = torch.randn(2, kv_heads, 12 * block, dim, generator=gen).bfloat16().unbind(0)
    q = torch.randn(new, heads, dim, generator=gen).bfloat16()
    args = (layout.tables, layout.seq_of, layout.ctx_len, block, dim**-0.5)
    got = native.paged_attention(q, k_cache.contiguous(), v_cache.contiguous(), layout, *args[3:])
    want = reference(q, k_cache, v_cache, *args)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
