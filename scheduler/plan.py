"""What one engine step computes: the scheduler's plan items, read by the runner as they are."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.sequence import Sequence


@dataclass(frozen=True)
class PrefillWork:
    """Compute ``token_ids`` at positions ``start_pos..``; context = start_pos + len(token_ids).

    One chunk of a prompt (after preemption: of prompt + outputs): the keys before
    ``start_pos`` are in the cache already (a cached prefix, or earlier chunks). Only a
    ``final`` chunk, the one that ends at the sequence's last token, is sampled."""

    seq: Sequence
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    final: bool

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id

    @property
    def end(self) -> int:
        """Tokens whose KV exists once this chunk is computed."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class DecodeWork:
    """Feed the last sampled token ``token_id`` at position ``pos``, and after it the
    ``draft`` tokens (speculative decoding) at the next positions, to be verified: the
    runner returns logits at each of the ``1 + len(draft)`` positions."""

    seq: Sequence
    token_id: int
    pos: int
    block_table: list[int]
    draft: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Positions fed: the token and its drafts."""
        return 1 + len(self.draft)

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id

    @property
    def end(self) -> int:
        """Tokens whose KV exists once this decode is computed (drafts not counted: only
        the ones accepted are kept, `ContinuousScheduler.on_step`)."""
        return self.pos + 1


@dataclass
class StepPlan:
    """What the model runner computes in one step, plus the sequences preempted for it."""

    prefills: list[PrefillWork] = field(default_factory=list)
    decodes: list[DecodeWork] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens fed to the model: all prefill tokens plus each decode's (1 + drafts)."""
        return sum(len(p.token_ids) for p in self.prefills) + sum(
            d.num_tokens for d in self.decodes
        )

    @property
    def empty(self) -> bool:
        """True when there is nothing to compute."""
        return not self.prefills and not self.decodes

    @property
    def seqs(self) -> list[Sequence]:
        """The sequences computed in this step: prefills first, then decodes (packed order)."""
        return [w.seq for w in self.prefills] + [w.seq for w in self.decodes]

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a next token this step, in the order of the runner's logits
        rows: final prefill chunks (a row each), then decodes (1 + drafts rows each)."""
        return [w.seq for w in self.prefills if w.final] + [w.seq for w in self.decodes]
