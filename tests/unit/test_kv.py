"""KV block pool and prefix cache (pure Python, no model or services)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kv import (
    BlockPool,
    KVCacheManager,
    NoFreeBlocks,
    PrefixProbe,
    block_hashes,
    extend_block_hashes,
    hash_block,
    tenant_salt,
)

BS = 16


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def snapshot(m: KVCacheManager, seqs: list[str]) -> tuple:
    return (
        m.stats(),
        [m.pool.ref_count(b) for b in range(m.num_blocks)],
        m.pool.free_ids(),
        m.pool.evictable_ids(),
        m.pool.indexed(),
        {s: m.block_table(s) for s in seqs},
    )


# -- hashing ---------------------------------------------------------------------------


def test_hashes_are_chained_deterministic_and_field_separated() -> None:
    hs = block_hashes(toks(40), BS, "m", "s")
    assert len(hs) == 2 and all(len(h) == 16 for h in hs)
    assert hs[0] == hash_block(None, toks(16), "m", "s")
    assert hs[1] == hash_block(hs[0], toks(16, 16), "m", "s")
    assert hs[1] != hash_block(None, toks(16, 16), "m", "s")
    assert hash_block(None, [1], "ab", "c") != hash_block(None, [1], "a", "bc")
    assert hash_block(None, [1, 2], "m", "") != hash_block(None, [258], "m", "")
    assert block_hashes(toks(15), BS, "m", "s") == []


def test_extend_block_hashes_only_hashes_new_blocks() -> None:
    known = block_hashes(toks(20), BS, "m", "s")
    same = known
    assert extend_block_hashes(known, toks(50), BS, "m", "s") is same
    assert known == block_hashes(toks(50), BS, "m", "s") and len(known) == 3
    fake = [b"x" * 16]  # a cached first hash is trusted, never recomputed
    assert extend_block_hashes(fake, toks(32), BS, "m", "s")[0] == b"x" * 16


def test_manager_extends_the_callers_hashes() -> None:
    m = KVCacheManager(16, BS, "m")
    known: list[bytes] = []
    assert m.probe(toks(20), "s", known) == PrefixProbe(0, 0)
    assert known == block_hashes(toks(20), BS, "m", "s")
    a = m.allocate("a", toks(20), "s", known)
    assert a is not None
    seq = toks(40)
    assert m.append_slots("a", 40)
    m.commit("a", seq, 33)  # the manager extends the same list as blocks fill
    assert known == block_hashes(seq, BS, "m", "s")
    assert m.hashes(toks(20), "s", known) == known[:1]  # only full blocks of the tokens given
    m.free("a")
    assert m.probe([*seq, 1], "s", known) == PrefixProbe(32, 0)


def test_tenant_salt() -> None:
    a = tenant_salt("alice", "k1")
    assert a == tenant_salt("alice", "k1") and len(a) == 64
    assert a != tenant_salt("bob", "k1")
    assert a != tenant_salt("alice", "k2")


# -- block pool ----------------------------------------------------------------------------


def test_pool_allocation_order_and_reuse() -> None:
    p = BlockPool(6)
    assert p.allocate(3) == [0, 1, 2]
    assert p.allocate(2) == [3, 4]
    p.release([1, 3])
    assert (p.num_free, p.num_used, p.ref_count(1)) == (3, 3, 0)
    assert p.allocate(3) == [1, 3, 5]
    with pytest.raises(NoFreeBlocks):
        p.allocate(1)
    assert p.num_used == 6


def test_pool_eviction_is_lru_tail_first() -> None:
    p = BlockPool(6)
    a, b = p.allocate(3), p.allocate(3)
    for bid in a + b:
        p.register(bid, bytes([bid]) * 16, ready=True)
    p.release(a)  # a: [0, 1, 2] -> LRU order 2, 1, 0
    p.release(b)  # then 5, 4, 3
    assert (p.num_evictable, p.num_free, p.num_available) == (6, 0, 6)
    p.touch([1])  # a hit: 1 leaves the LRU
    assert p.num_evictable == 5 and p.ref_count(1) == 1
    assert p.allocate(2) == [2, 0]
    assert p.evictions == 2
    assert p.lookup(bytes([2]) * 16) is None and p.lookup(bytes([5]) * 16) == 5
    p.release([1])  # 1 becomes the most recently released
    assert p.allocate(4) == [5, 4, 3, 1]
    assert p.evictions == 6


def test_pool_refcount_never_negative_and_pending() -> None:
    p = BlockPool(2)
    [b] = p.allocate(1)
    h = b"x" * 16
    assert p.register(b, h, ready=False) == b
    assert p.is_pending(h) and p.lookup(h) is None
    [c] = p.allocate(1)
    assert p.register(c, h, ready=True) == b  # existing index wins
    p.mark_ready(b)
    assert p.lookup(h) == b and not p.is_pending(h)
    p.release([b])
    with pytest.raises(ValueError):
        p.release([b])
    with pytest.raises(ValueError):
        p.release([c, c])
    assert p.ref_count(c) == 1  # failed release changed nothing
    p.release([c])
    assert p.ref_count(b) == 0 and p.num_used == 0 and p.num_available == 2
    [d] = p.allocate(1)
    p.register(d, b"y" * 16, ready=False)
    p.forget(d)
    assert not p.is_pending(b"y" * 16)


# -- manager: prefix cache ---------------------------------------------------------------------


def test_prefix_hit_after_commit_and_not_before() -> None:
    m = KVCacheManager(16, BS, "m")
    prefix = toks(40)
    a = m.allocate("a", [*prefix, 1000], "s")
    assert a is not None and a.block_ids == [0, 1, 2] and a.num_cached_tokens == 0
    # before a's commit: its blocks are pending, nothing is shared
    second = [*prefix, 2000, 2001]
    assert m.probe(second, "s") == PrefixProbe(cached_tokens=0, pending_tokens=32)
    b = m.allocate("b", second, "s")
    assert b is not None and b.num_cached_tokens == 0 and b.block_ids == [3, 4, 5]
    m.free("b")
    m.commit("a", [*prefix, 1000])
    assert m.probe(second, "s") == PrefixProbe(cached_tokens=32, pending_tokens=0)
    c = m.allocate("c", second, "s")
    assert c is not None and c.num_cached_tokens == 32 and c.block_ids == [0, 1, 3]
    assert m.num_cached_tokens("c") == 32
    assert m.pool.ref_count(0) == m.pool.ref_count(1) == 2
    assert m.pool.ref_count(c.block_ids[2]) == 1


def test_full_cache_hit_is_capped() -> None:
    m = KVCacheManager(8, BS)
    assert m.allocate("a", toks(32), "s") is not None
    m.commit("a", toks(32))
    m.free("a")
    assert m.probe(toks(32), "s") == PrefixProbe(16, 0)
    c = m.allocate("c", toks(32), "s")
    assert c is not None and c.num_cached_tokens == 16 and c.block_ids[0] == 0
    assert c.block_ids[1] != 1  # the last block is recomputed into a fresh block
    m.commit("c", toks(32))
    assert m.pool.lookup(block_hashes(toks(32), BS, "", "s")[1]) == 1  # original stays indexed


@pytest.mark.parametrize(("salt", "model"), [("other", "m"), ("s", "other-model")])
def test_salt_and_model_isolation(salt: str, model: str) -> None:
    m = KVCacheManager(16, BS, "m")
    m.allocate("a", toks(40), "s")
    m.commit("a", toks(40))
    m.model_id = model  # the same pool serving another model's hashes
    assert m.probe(toks(40), salt) == PrefixProbe(0, 0)
    b = m.allocate("b", toks(40), salt)
    assert b is not None and b.num_cached_tokens == 0 and b.block_ids == [3, 4, 5]
    m.model_id = "m"
    hit = m.allocate("hit", toks(40), "s")
    assert hit is not None and hit.num_cached_tokens == 32


def test_decode_filled_blocks_are_cached() -> None:
    m = KVCacheManager(16, BS)
    prompt = toks(20)
    m.allocate("a", prompt, "s")
    m.commit("a", prompt)
    seq = list(prompt)
    for t in range(100, 120):  # decode 20 tokens -> crosses into a third block
        assert m.append_slots("a", len(seq) + 1)
        seq.append(t)
        m.commit("a", seq)
    assert len(m.block_table("a")) == 3
    m.free("a")
    b = m.allocate("b", [*seq, 7], "s")  # preempted / follow-up prompt = prompt + outputs
    assert b is not None and b.num_cached_tokens == 32
    assert b.block_ids[:2] == [0, 1]


def test_allocate_none_and_append_false_change_nothing() -> None:
    m = KVCacheManager(4, BS)
    m.allocate("a", toks(32), "s")
    m.commit("a", toks(32))
    m.free("a")  # blocks 0,1 evictable
    m.allocate("x", toks(20, 5000), "s")  # blocks 2,3 used
    # hit on block 0 (touch takes it off the LRU) + 2 new blocks > 1 remaining available
    before = snapshot(m, ["x"])
    assert m.allocate("b", toks(48), "s") is None
    assert snapshot(m, ["x"]) == before
    assert "b" not in m
    # 1 hit block + 1 new block fits exactly
    b = m.allocate("b", toks(20), "s")
    assert b is not None and b.num_cached_tokens == 16 and b.block_ids == [0, 1]
    assert m.pool.evictions == 1
    before = snapshot(m, ["x", "b"])
    assert not m.append_slots("x", 33)
    assert snapshot(m, ["x", "b"]) == before
    assert m.append_slots("x", 32)  # already fits
    assert snapshot(m, ["x", "b"]) == before


def test_free_everything_and_duplicate_seq() -> None:
    m = KVCacheManager(8, BS)
    m.allocate("a", toks(40), "s")
    with pytest.raises(ValueError):
        m.allocate("a", toks(4), "s")
    m.commit("a", toks(40))
    m.allocate("b", toks(40), "s")
    m.free("a")
    m.free("b")
    s = m.stats()
    assert s.num_used == 0 and s.num_free + s.num_evictable == 8
    assert m.pool.num_available == 8
    with pytest.raises(ValueError):
        m.pool.release([0])


def test_free_before_commit_forgets_pending() -> None:
    m = KVCacheManager(8, BS)
    m.allocate("a", toks(40), "s")
    assert m.probe(toks(40), "s").pending_tokens == 32
    m.free("a")
    assert m.probe(toks(40), "s") == PrefixProbe(0, 0)
    b = m.allocate("b", toks(40), "s")
    assert b is not None and b.num_cached_tokens == 0
    assert m.stats().num_evictable == 0


def test_hit_accounting() -> None:
    m = KVCacheManager(16, BS)
    assert m.stats().hit_rate == 0.0
    m.allocate("a", toks(40), "s")
    m.commit("a", toks(40))
    m.allocate("b", toks(40), "s")
    m.allocate("c", toks(20), "s")
    s = m.stats()
    assert (s.queried_tokens, s.hit_tokens) == (100, 48)
    assert s.hit_rate == pytest.approx(0.48)


def test_can_fit_and_blocks_needed() -> None:
    m = KVCacheManager(4, BS)
    assert (m.blocks_needed(0), m.blocks_needed(16), m.blocks_needed(17)) == (0, 1, 2)
    assert m.can_fit(64) and not m.can_fit(65)
    assert (m.block_size, m.num_blocks) == (16, 4)


# -- stateful model check ------------------------------------------------------------------------

SBS = 4
PREFIXES = [toks(12, 1000), toks(8, 2000), toks(6, 3000)]
SALTS = ["t1", "t2"]


class KVMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = KVCacheManager(10, SBS, "m")
        self.seqs: dict[str, list[int]] = {}  # id -> tokens held (prompt + outputs)
        self.computed: dict[str, int] = {}
        self.n = 0

    @rule(p=st.integers(0, 2), tail=st.integers(0, 6), salt=st.sampled_from(SALTS))
    def allocate(self, p: int, tail: int, salt: str) -> None:
        self.n += 1
        sid = f"s{self.n}"
        tokens = PREFIXES[p] + toks(tail, 10_000 * self.n)
        if not tokens:
            return
        before = snapshot(self.m, list(self.seqs))
        a = self.m.allocate(sid, tokens, salt)
        if a is None:
            assert snapshot(self.m, list(self.seqs)) == before
            return
        assert a.num_cached_tokens < len(tokens) and a.num_cached_tokens % SBS == 0
        assert len(a.block_ids) == self.m.blocks_needed(len(tokens))
        self.seqs[sid] = tokens
        self.computed[sid] = 0

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        if not self.seqs:
            return
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.m.commit(sid, self.seqs[sid])
        self.computed[sid] = len(self.seqs[sid])

    @rule(data=st.data(), k=st.integers(1, 5))
    def decode(self, data: st.DataObject, k: int) -> None:
        cand = sorted(s for s in self.seqs if self.computed[s] == len(self.seqs[s]))
        if not cand:
            return
        sid = data.draw(st.sampled_from(cand))
        before = snapshot(self.m, list(self.seqs))
        if not self.m.append_slots(sid, len(self.seqs[sid]) + k):
            assert snapshot(self.m, list(self.seqs)) == before
            return
        self.seqs[sid] = self.seqs[sid] + [7] * k
        self.m.commit(sid, self.seqs[sid])
        self.computed[sid] = len(self.seqs[sid])

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        if not self.seqs:
            return
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.m.free(sid)
        del self.seqs[sid], self.computed[sid]

    @invariant()
    def consistent(self) -> None:
        m, pool = self.m, self.m.pool
        refs = [pool.ref_count(b) for b in range(m.num_blocks)]
        assert min(refs) >= 0
        owners: dict[int, int] = {}
        for sid in self.seqs:
            for b in m.block_table(sid):
                owners[b] = owners.get(b, 0) + 1
                assert b not in pool.free_ids()
        assert sum(owners.values()) == sum(refs)
        assert all(refs[b] == k for b, k in owners.items())
        assert pool.num_free + pool.num_evictable + pool.num_used == m.num_blocks
        assert pool.num_used == len(owners)
        for b, k in owners.items():
            if k > 1:
                assert pool.is_ready(b) and pool.lookup(pool.block_hash(b)) == b

    def teardown(self) -> None:
        for sid in list(self.seqs):
            self.m.free(sid)
        assert self.m.pool.num_used == 0
        assert self.m.pool.num_available == self.m.num_blocks


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
