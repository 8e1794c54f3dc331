"""When and how much to draft: speculative decoding's per-step, per-sequence policy.

A running sequence gets up to ``num_tokens`` drafted tokens (prompt lookup, `NgramIndex`) to
verify with its next decode, in one forward of ``1 + drafts`` positions. Drafting pays only
where a decode step is bound by reading the weights, not by compute: so nobody drafts in a
step with more than ``max_running`` sequences decoding, and a sequence whose recent drafts
were mostly rejected (acceptance below ``min_acceptance``) drafts only on every
``PROBE_EVERY``-th token until its guesses get better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.ngram import NgramIndex

WARMUP = 8  # recent drafted tokens before a sequence's acceptance rate is judged
WINDOW = 32  # recent counts are halved past this many drafted tokens (a decaying window)
PROBE_EVERY = 8  # a sequence with a low acceptance rate still drafts at every 8th token


@dataclass
class Drafts:
    """One sequence's drafting state: its n-gram index and recent acceptance."""

    index: NgramIndex
    recent_drafted: float = 0.0
    recent_accepted: float = 0.0

    def record(self, drafted: int, accepted: int) -> None:
        self.recent_drafted += drafted
        self.recent_accepted += accepted
        if self.recent_drafted > WINDOW:
            self.recent_drafted /= 2
            self.recent_accepted /= 2

    @property
    def rate(self) -> float | None:
        """The recent acceptance rate, None before `WARMUP` drafted tokens."""
        if self.recent_drafted < WARMUP:
            return None
        return self.recent_accepted / self.recent_drafted


@dataclass(frozen=True)
class Speculation:
    """Prompt-lookup speculation's knobs (`EngineConfig`'s ``spec_*``)."""

    num_tokens: int  # k: most tokens drafted per sequence and step
    min_n: int = 1
    max_n: int = 3
    max_running: int = 4  # more sequences decoding than this: nobody drafts (compute-bound)
    min_acceptance: float = 0.3

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.max_running < 1:
            raise ValueError("num_tokens and max_running must be >= 1")
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise ValueError(f"min_acceptance must be in [0, 1], got {self.min_acceptance}")
        NgramIndex(self.min_n, self.max_n)  # validates the n-gram range

    def draft(self, drafts: Drafts | None, tokens: Sequence[int], most: int) -> list[int]:
        """Up to ``min(num_tokens, most)`` tokens to verify after ``tokens`` (maybe none)."""
        k = min(self.num_tokens, most)
        if drafts is None or k <= 0:
            return []
        rate = drafts.rate
        if rate is not None and rate < self.min_acceptance and len(tokens) % PROBE_EVERY:
            return []
        return drafts.index.propose(tokens, k)

    def new_drafts(self) -> Drafts:
        return Drafts(NgramIndex(self.min_n, self.max_n))
