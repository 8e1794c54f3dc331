"""One request's state as the scheduler tracks it: tokens, limits, KV progress, block hashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kv.hashing import BlockHash
from scheduler.speculation import Drafts


class SeqStatus(StrEnum):
    WAITING = "waiting"
    PREFILLING = "prefilling"  # admitted; its prompt's chunks are being computed
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt and the tokens generated after it, in one list.

    ``block_hashes`` are the chained prefix-cache hashes of the full blocks of ``token_ids``:
    computed once, extended as blocks fill (the KV manager extends this very list). Engines
    subclass it to hang their per-request state on the same object; `append` is the one place
    that decides when a sequence is finished.
    """

    seq_id: str
    token_ids: list[int]  # prompt + outputs
    max_tokens: int
    priority: int = 0
    arrival: float = 0.0  # the scheduler's clock (monotonic seconds)
    salt: str = ""
    num_prompt_tokens: int = -1  # -1: all of ``token_ids`` as given
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose KV exists in the cache
    num_cached: int = 0  # prompt tokens served from the prefix cache at (last) admission
    computed_tokens: int = 0  # tokens computed over its life: prefill, recompute, decode
    preemptions: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)
    draft_tokens: int = 0  # speculative tokens proposed for it and verified
    accepted_tokens: int = 0  # of those, the ones the model agreed with (kept)
    drafts: Drafts | None = None  # its n-gram index and recent acceptance (speculation on)

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        """The tokens generated so far."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append(self, token: int) -> bool:
        """Take one sampled token; True when the sequence is finished (here: max_tokens)."""
        self.token_ids.append(token)
        return self.num_outputs >= self.max_tokens
