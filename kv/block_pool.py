"""Reference-counted KV block pool with a hash index and an LRU of evictable cached blocks."""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Sequence

from kv.hashing import BlockHash


class NoFreeBlocks(RuntimeError):
    """Not enough free or evictable blocks for an allocation."""


class BlockPool:
    """Fixed set of block ids ``0..num_blocks-1``.

    A block is in exactly one state: *free* (ref 0, no hash; a min-heap, lowest id first),
    *evictable* (ref 0, READY hash; an LRU, oldest first) or *used* (ref > 0).
    A hash is *pending* while its block's KV is not yet computed; only READY hashes are hits.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.evictions = 0
        self._ref = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks))  # heap
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._index: dict[BlockHash, int] = {}
        self._hash: dict[int, BlockHash] = {}
        self._ready: set[int] = set()
        self._num_used = 0

    # -- counters ------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._lru)

    def free_ids(self) -> list[int]:
        """Free block ids, lowest first (the order `allocate` takes them)."""
        return sorted(self._free)

    def evictable_ids(self) -> list[int]:
        """Evictable cached block ids, least recently released first (the eviction order)."""
        return list(self._lru)

    def indexed(self) -> dict[BlockHash, int]:
        """A copy of the hash index: every registered hash (pending or ready) -> block id."""
        return dict(self._index)

    def ref_count(self, block_id: int) -> int:
        return self._ref[self._check(block_id)]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The hash indexed for ``block_id`` (pending or ready), if any."""
        return self._hash.get(self._check(block_id))

    def is_ready(self, block_id: int) -> bool:
        """Whether ``block_id`` is a READY cached block."""
        return self._check(block_id) in self._ready

    # -- ref counting ----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (ref 1): free ones lowest id first, then evict LRU cached ones."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > self.num_available:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_available} available")
        out: list[int] = []
        for _ in range(n):
            if self._free:
                bid = heapq.heappop(self._free)
            else:
                bid, _ = self._lru.popitem(last=False)
                self._drop_hash(bid)
                self.evictions += 1
            self._ref[bid] = 1
            out.append(bid)
        self._num_used += n
        return out

    def touch(self, block_ids: Sequence[int]) -> None:
        """Increment ref counts; a cached block at ref 0 leaves the evictable LRU."""
        for bid in block_ids:
            self._check(bid)
            if self._ref[bid] == 0 and bid not in self._lru:
                raise ValueError(f"block {bid} is free; allocate it instead of touching it")
        for bid in block_ids:
            if self._ref[bid] == 0:
                del self._lru[bid]
                self._num_used += 1
            self._ref[bid] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Decrement ref counts; at 0 a READY block becomes evictable, any other goes free.

        Iterates in reverse so that the last block of ``block_ids`` is evicted first.
        """
        for bid, k in Counter(block_ids).items():
            if self._ref[self._check(bid)] < k:
                raise ValueError(f"block {bid} released more often than referenced")
        for bid in reversed(block_ids):
            self._ref[bid] -= 1
            if self._ref[bid]:
                continue
            self._num_used -= 1
            if bid in self._ready:
                self._lru[bid] = None
            else:
                self._drop_hash(bid)  # a pending hash of an unused block is meaningless
                heapq.heappush(self._free, bid)

    # -- hash index --------------------------------------------------------------------------

    def register(self, block_id: int, block_hash: BlockHash, *, ready: bool) -> int:
        """Index ``block_id`` under ``block_hash``; returns the id already indexed, if another."""
        self._check(block_id)
        existing = self._index.get(block_hash)
        if existing is not None and existing != block_id:
            return existing
        if self._ref[block_id] == 0:
            raise ValueError(f"block {block_id} is not in use")
        old = self._hash.get(block_id)
        if old is not None and old != block_hash:
            raise ValueError(f"block {block_id} is already registered under another hash")
        self._index[block_hash] = block_id
        self._hash[block_id] = block_hash
        if ready:
            self._ready.add(block_id)
        return block_id

    def mark_ready(self, block_id: int) -> None:
        """The KV of ``block_id`` is computed: its hash becomes a cache hit."""
        if self._check(block_id) not in self._hash:
            raise ValueError(f"block {block_id} has no hash")
        self._ready.add(block_id)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The READY block cached under ``block_hash``, if any."""
        bid = self._index.get(block_hash)
        return bid if bid is not None and bid in self._ready else None

    def is_pending(self, block_hash: BlockHash) -> bool:
        """Whether ``block_hash`` is indexed but its KV is not computed yet."""
        bid = self._index.get(block_hash)
        return bid is not None and bid not in self._ready

    def forget(self, block_id: int) -> None:
        """Drop the pending (never ready) hash of ``block_id``; no-op if it has none."""
        if self._check(block_id) in self._ready:
            raise ValueError(f"block {block_id} is ready; cached KV is dropped only by eviction")
        self._drop_hash(block_id)

    # -- internals ---------------------------------------------------------------------------

    def _drop_hash(self, block_id: int) -> None:
        h = self._hash.pop(block_id, None)
        if h is not None and self._index.get(h) == block_id:
            del self._index[h]
        self._ready.discard(block_id)

    def _check(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range")
        return block_id
