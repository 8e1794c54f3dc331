"""Prefix-affinity routing: which live worker should run a job, so that jobs sharing a prompt
prefix meet the same prefix cache. Pure logic over names, loads and token ids.

A job's key is its tenant and the hash of its leading token blocks (up to `blocks` full
blocks: enough to sit inside a shared system prompt, not so many that the user's own text
changes it). Workers are ranked per key by rendezvous hashing; the first one whose load stays
within `factor` times the least-loaded worker's plus `SLACK` takes the job. So the busiest
worker holds at most about `factor` times the idlest one's jobs, a hot prefix spills to its
second and third worker (replicated, not pinned), and a dead or added worker moves only the
keys it ranked first for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kv.hashing import block_hashes

SLACK = 6  # jobs a worker may hold beyond `factor` x the idlest one's before it sheds


def prefix_key(
    tenant: str, model: str, prompt_ids: Sequence[int], block_size: int = 16, blocks: int = 8
) -> bytes | None:
    """The routing key of a prompt (the prefix cache's chained hash of its leading blocks),
    or None when it has no full block to share."""
    full = min(len(prompt_ids) // block_size, blocks)
    if full == 0:
        return None
    return block_hashes(prompt_ids[: full * block_size], block_size, model, tenant)[-1]


def _score(key: bytes, worker: str) -> bytes:
    return hashlib.blake2b(key + b"\0" + worker.encode(), digest_size=8).digest()


@dataclass(frozen=True, slots=True)
class Peer:
    """A live worker as the registry last saw it."""

    name: str
    load: int  # jobs it holds plus messages waiting in its affinity queue
    models: frozenset[str]


@dataclass
class Router:
    """Picks an owner per key among the live peers; `assign` counts what this worker sent
    since the last `refresh`, so a burst spreads before the registry shows it."""

    factor: float = 1.2
    peers: dict[str, Peer] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)

    def refresh(self, peers: Mapping[str, Peer]) -> None:
        self.peers, self.sent = dict(peers), {}

    def load(self, name: str) -> int:
        return self.peers[name].load + self.sent.get(name, 0)

    def owner(self, key: bytes, model: str) -> str | None:
        """The worker to run a job of `model` with this key (None: no peer serves it)."""
        able = [p.name for p in self.peers.values() if model in p.models]
        if not able:
            return None
        ranked = sorted(able, key=lambda name: _score(key, name), reverse=True)
        cap = self.factor * min(self.load(name) for name in able) + SLACK
        chosen = next((n for n in ranked if self.load(n) + 1 <= cap), None)
        if chosen is None:  # everyone is at the cap: the least loaded, in rank order
            chosen = min(ranked, key=self.load)
        self.sent[chosen] = self.sent.get(chosen, 0) + 1
        return chosen
