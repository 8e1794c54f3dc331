"""Prompt-lookup (n-gram) drafting for speculative decoding: no draft model.

A sequence's next tokens are guessed from its own text: find the longest n-gram (``min_n`` to
``max_n`` tokens) ending the prompt + output so far that also occurs earlier, and propose the
tokens that followed its most recent earlier occurrence. Extractive work (quoting, editing a
given passage or snippet) repeats long runs of its prompt, so those guesses are often right;
the engine verifies them in one forward and keeps the ones the model agrees with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class NgramIndex:
    """Where each n-gram (``min_n``..``max_n`` tokens) of one token list last ended, built
    incrementally: each token is indexed once however often the list is drafted from."""

    min_n: int
    max_n: int
    _last_end: dict[tuple[int, ...], int] = field(default_factory=dict)
    _indexed: int = 0  # n-grams ending before this position are in `_last_end`

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")

    def _extend(self, tokens: Sequence[int], upto: int) -> None:
        """Index the n-grams ending at positions ``_indexed .. upto - 1``."""
        for end in range(self._indexed, upto):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self._last_end[tuple(tokens[end + 1 - n : end + 1])] = end
        self._indexed = max(self._indexed, upto)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """``k`` tokens that followed the most recent earlier occurrence of the longest n-gram
        ending ``tokens`` (`_copy`); [] when none occurs earlier. ``tokens`` must only grow
        between calls (the index remembers what it has seen)."""
        last = len(tokens) - 1
        if k <= 0 or last < 1:
            return []
        self._extend(tokens, last)  # every n-gram ending before the last token
        for n in range(min(self.max_n, last), self.min_n - 1, -1):
            end = self._last_end.get(tuple(tokens[last + 1 - n :]))
            if end is not None:
                return self._copy(tokens, end + 1, k)
        return []

    @staticmethod
    def _copy(tokens: Sequence[int], start: int, k: int) -> list[int]:
        """``k`` tokens from ``start`` on, running on into the copy itself past the end (as
        an LZ77 match does): a text repeating with a period shorter than ``k`` drafts whole."""
        out: list[int] = []
        for i in range(start, start + k):
            out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
        return out
