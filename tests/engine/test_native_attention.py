"""The C paged-attention kernel against attention computed densely in fp64."""

from __future__ import annotations

import pytest
import torch

from worker.engine import native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


def reference(q, k_cache, v_cache, tables, seq_of, ctx_len, block_size, scale):
    """Each token's keys gathered through its block table, softmax in fp64."""
    tokens, heads, dim = q.shape
    g = heads // k_cache.shape[0]
    out = torch.empty(tokens, heads, dim, dtype=torch.float64)
    for t in range(tokens):
        n = int(ctx_len[t])
        slots = [int(tables[seq_of[t], p // block_size]) * block_size + p % block_size
                 for p in range(n)]  # fmt: skip
        k = k_cache[:, slots].double().repeat_interleave(g, 0)  # [heads, n, d]
        v = v_cache[:, slots].double().repeat_interleave(g, 0)
        w = (q[t].double()[:, None, :] @ k.transpose(1, 2) * scale).softmax(-1)
        out[t] = (w @ v)[:, 0]
    return out


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block"), [(9, 3, 64, 16), (4, 4, 32, 8)])
def test_matches_dense_attention(dtype, tol, heads, kv_heads, dim, block):
    gen = torch.Generator().manual_seed(0)
    blocks = 40
    k_cache = torch.randn(kv_heads, blocks * block, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, blocks * block, dim, generator=gen).to(dtype)
    # three sequences: a long one, one sharing its first blocks, a one-token one
    tables = torch.tensor(
        [
            [5, 9, 2, 30, 31, 7, 8, 10, 13, 14, 15, 16],
            [5, 9, 11, 12, 18, 19, 20, 21, 0, 0, 0, 0],
            [17] + [0] * 11,
        ],
        dtype=torch.int32,
    )
    # a prefill of 5 tokens at positions 80..84 of seq 0, decodes of seq 1 and seq 2
    seq_of = torch.tensor([0, 0, 0, 0, 0, 1, 2], dtype=torch.int32)
    ctx_len = torch.tensor([81, 82, 83, 84, 85, 50, 1], dtype=torch.int32)
    packed = torch.randn(len(seq_of), heads * dim, generator=gen).to(dtype)
    q = packed.view(len(seq_of), heads, dim)
    scale = dim**-0.5
    got = native.paged_attention(q, k_cache, v_cache, tables, seq_of, ctx_len, block, scale)
    want = reference(q, k_cache, v_cache, tables, seq_of, ctx_len, block, scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_strided_queries():
    """Queries laid out [heads, T, d] in memory (a transposed view) give the same result."""
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(2, 2, 64, 32, generator=gen).unbind(0)
    tables = torch.tensor([[1, 3]], dtype=torch.int32)
    seq_of, ctx_len = torch.zeros(3, dtype=torch.int32), torch.tensor([5, 6, 7], dtype=torch.int32)
    head_major = torch.randn(4, 3, 32, generator=gen)  # [heads, T, d]
    args = (k_cache, v_cache, tables, seq_of, ctx_len, 8, 0.25)
    strided = native.paged_attention(head_major.transpose(0, 1), *args)
    dense = native.paged_attention(head_major.transpose(0, 1).contiguous(), *args)
    assert torch.equal(strided, dense)
