"""Prefix-cached KV block manager: per-sequence block tables over a shared `BlockPool`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kv.block_pool import BlockPool
from kv.hashing import BlockHash, extend_block_hashes


@dataclass(frozen=True)
class Allocation:
    """Block table of a newly admitted sequence and how many of its tokens are cached."""

    block_ids: list[int]
    num_cached_tokens: int


@dataclass(frozen=True)
class PrefixProbe:
    """Prefix hit a prompt would get now, and the extra hit once in-flight blocks finish."""

    cached_tokens: int
    pending_tokens: int


@dataclass(frozen=True)
class CacheStats:
    """Cache counters and pool occupancy."""

    queried_tokens: int
    hit_tokens: int
    evictions: int
    num_free: int
    num_used: int
    num_evictable: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class _Seq:
    salt: str
    table: list[int]
    hashes: list[BlockHash]  # chained hashes of the known full blocks (maybe the caller's list)
    num_cached_tokens: int
    num_matched: int  # leading blocks shared from the cache (READY, not ours to register)
    pending: set[int] = field(default_factory=set)  # our blocks registered but not yet ready
    num_committed: int = 0  # leading full blocks already processed by commit()
    num_registered: int = 0  # leading full blocks already offered to the index (pending)


class KVCacheManager:
    """Allocates block tables with prefix caching keyed by (model_id, salt, tokens)."""

    def __init__(self, num_blocks: int, block_size: int = 16, model_id: str = "") -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.model_id = model_id
        self._seqs: dict[str, _Seq] = {}
        self._queried = 0
        self._hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_fit(self, num_tokens: int) -> bool:
        """Whether the whole pool could hold ``num_tokens`` tokens at all."""
        return self.blocks_needed(num_tokens) <= self.num_blocks

    def _cap(self, num_blocks: int, num_tokens: int) -> int:
        """Cap a hit of ``num_blocks`` so at least one token is left to compute."""
        return (
            num_blocks - 1
            if num_blocks and num_blocks * self.block_size >= num_tokens
            else num_blocks
        )

    def hashes(
        self, token_ids: Sequence[int], salt: str, known: list[BlockHash] | None = None
    ) -> list[BlockHash]:
        """The chained hashes of the full blocks of ``token_ids``: ``known`` (a caller's cached
        hashes of a leading part, extended in place by the new full blocks) or a fresh list."""
        hashes = [] if known is None else known
        extend_block_hashes(hashes, token_ids, self.block_size, self.model_id, salt)
        return hashes[: len(token_ids) // self.block_size]

    def probe(
        self, token_ids: Sequence[int], salt: str, known: list[BlockHash] | None = None
    ) -> PrefixProbe:
        """Prefix hit for ``token_ids`` now (READY) and once pending blocks are computed.
        ``known``: the sequence's cached block hashes (see `hashes`)."""
        ready = pending = 0
        for h in self.hashes(token_ids, salt, known):
            if not pending and self.pool.lookup(h) is not None:
                ready += 1
            elif self.pool.lookup(h) is not None or self.pool.is_pending(h):
                pending += 1
            else:
                break
        total = self._cap(ready + pending, len(token_ids))
        ready = min(ready, total)
        return PrefixProbe(ready * self.block_size, (total - ready) * self.block_size)

    def allocate(
        self,
        seq_id: str,
        token_ids: Sequence[int],
        salt: str,
        known: list[BlockHash] | None = None,
        max_new_tokens: int | None = None,
    ) -> Allocation | None:
        """Admit a sequence: share its READY cached prefix and allocate blocks for the next
        ``max_new_tokens`` (default: all) of the rest, or None if blocks are short.

        A prompt prefilled in chunks gets the blocks of its first chunk here and those of the
        next ones from `append_slots`. The full blocks allocated are indexed as pending
        (computed this step), so a prompt with the same prefix waits for them rather than
        computing them again. With ``known`` (the sequence's cached block hashes), the manager
        keeps extending that same list as the sequence's blocks fill: each block is hashed
        once."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already allocated")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        hashes = [] if known is None else known
        extend_block_hashes(hashes, token_ids, self.block_size, self.model_id, salt)
        matched: list[int] = []
        for h in hashes[: len(token_ids) // self.block_size]:
            bid = self.pool.lookup(h)
            if bid is None:
                break
            matched.append(bid)
        del matched[self._cap(len(matched), len(token_ids)) :]
        cached = len(matched) * self.block_size
        held = len(token_ids) if max_new_tokens is None else cached + max_new_tokens
        held = min(held, len(token_ids))
        need = self.blocks_needed(held) - len(matched)
        revived = sum(1 for b in matched if self.pool.ref_count(b) == 0)
        if need > self.pool.num_available - revived:
            return None
        self.pool.touch(matched)
        table = matched + self.pool.allocate(need)
        seq = _Seq(salt, table, hashes, cached, len(matched), num_registered=len(matched))
        self._register_pending(seq, held)
        self._seqs[seq_id] = seq
        self._queried += len(token_ids)
        self._hits += seq.num_cached_tokens
        return Allocation(list(table), seq.num_cached_tokens)

    def _register_pending(self, seq: _Seq, num_tokens: int) -> None:
        """Index the full blocks among the first ``num_tokens`` not yet offered as pending
        (their hashes must be known); a hash another block holds already is left to it."""
        first = max(seq.num_registered, seq.num_committed)
        upto = min(num_tokens // self.block_size, len(seq.hashes))
        for i in range(first, upto):
            bid = seq.table[i]
            if self.pool.register(bid, seq.hashes[i], ready=False) == bid:
                seq.pending.add(bid)
        seq.num_registered = max(seq.num_registered, upto)

    def commit(
        self, seq_id: str, token_ids: Sequence[int], num_computed: int | None = None
    ) -> None:
        """KV for the first ``num_computed`` (default: all) of ``token_ids`` is now written:
        make its full blocks cache hits."""
        seq = self._seqs[seq_id]
        bs = self.block_size
        num_computed = len(token_ids) if num_computed is None else num_computed
        num_full = num_computed // bs
        if num_full > len(seq.table):
            raise ValueError(f"{num_computed} tokens exceed the block table")
        if num_full > len(seq.hashes):
            extend_block_hashes(seq.hashes, token_ids[: num_full * bs], bs, self.model_id, seq.salt)
        for i in range(seq.num_committed, num_full):
            bid = seq.table[i]
            if i < seq.num_matched:
                continue
            if bid in seq.pending:
                self.pool.mark_ready(bid)
                seq.pending.discard(bid)
            else:
                self.pool.register(bid, seq.hashes[i], ready=True)
        seq.num_committed = max(seq.num_committed, num_full)

    def append_slots(
        self, seq_id: str, num_tokens: int, token_ids: Sequence[int] | None = None
    ) -> bool:
        """Grow the table to hold ``num_tokens`` tokens; False (no change) if blocks are short.

        With ``token_ids`` (the sequence's tokens: the next chunk of a prompt, or a decode's),
        the full blocks among the first ``num_tokens`` are hashed and indexed as pending, as
        `allocate` does; without, they are indexed when `commit` finds them computed."""
        seq = self._seqs[seq_id]
        need = self.blocks_needed(num_tokens) - len(seq.table)
        if need > self.pool.num_available:
            return False
        if need > 0:
            seq.table.extend(self.pool.allocate(need))
        if token_ids is not None:
            bs = self.block_size
            full = min(num_tokens, len(token_ids)) // bs * bs
            extend_block_hashes(seq.hashes, token_ids[:full], bs, self.model_id, seq.salt)
            self._register_pending(seq, num_tokens)
        return True

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks; hashes of blocks never computed are forgotten."""
        seq = self._seqs.pop(seq_id)
        for bid in seq.pending:
            self.pool.forget(bid)
        self.pool.release(seq.table)

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._seqs[seq_id].table)

    def num_cached_tokens(self, seq_id: str) -> int:
        return self._seqs[seq_id].num_cached_tokens

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def stats(self) -> CacheStats:
        p = self.pool
        return CacheStats(
            self._queried, self._hits, p.evictions, p.num_free, p.num_used, p.num_evictable
        )
