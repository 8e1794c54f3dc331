"""Stop strings at a constant cost per token, and streamed text: incremental detokenization, a
stop-string watch over the text each token adds, and the text a streaming sequence hands out.

`IncrementalDetokenizer` decodes only the last few tokens at each step, with the prefix/read
offsets of vLLM's detokenizer: the tokens after `read` have not been turned into text yet;
the ones from `prefix` to `read` are decoded with them as context, and the text the new tokens
add is what decoding them with the context gives beyond decoding the context alone. Byte-level
BPE splits characters across tokens: a decode that ends in U+FFFD (an incomplete character)
is held back until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # a decoder's text for bytes that are not (yet) a whole character
# A UTF-8 character spans at most 4 tokens; a text still ending in U+FFFD after this many held
# tokens is broken bytes, not a character coming together: it is taken as it is, so that a
# stream of broken bytes costs no more per token than text does.
MAX_HELD = 16


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string begins in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class IncrementalDetokenizer:
    """The text a growing list of token ids adds, one token at a time. Joined, what `push`
    returns is `decode(all tokens)` (less a trailing incomplete character)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # first token of the context decoded with the unread tokens
        self._read = 0  # tokens before this one are text already
        self._shown = 0  # characters of the unread tokens' text that `push` has returned

    def push(self, token: int) -> str:
        """Take the next token; the text it adds (empty while a character is incomplete)."""
        self._ids.append(token)
        context = len(self._decode(self._ids[self._prefix : self._read]))
        text = self._decode(self._ids[self._prefix :])[context:]
        incomplete = not text or text.endswith(REPLACEMENT)
        hold = incomplete and len(self._ids) - self._read < MAX_HELD
        if hold:
            text = text.rstrip(REPLACEMENT)  # what comes before the incomplete character shows
        new = text[self._shown :]
        if hold:
            self._shown = max(self._shown, len(text))
        else:
            self._prefix, self._read, self._shown = self._read, len(self._ids), 0
        return new


def stop_margin(stops: Sequence[str]) -> int:
    """Characters at the end of a text a stop string could still begin in (its longest
    one's length - 1): a stop string beginning before them would have been found already."""
    return max(map(len, stops), default=1) - 1


class StopWatch:
    """Watches a sequence's text for stop strings: each token's new text (from the
    sequence's `IncrementalDetokenizer`) is searched together with the characters before it
    that a stop string could start in (`stop_margin`), so the cost per token does not grow
    with the text."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._keep = stop_margin(self._stops)
        self._tail = ""  # the last `_keep` characters of the text seen so far

    def see(self, new_text: str) -> bool:
        """Take the text the next token added; True when a stop string has appeared."""
        window = self._tail + new_text
        self._tail = window[max(0, len(window) - self._keep) :] if self._keep else ""
        return find_stop(window, self._stops) is not None


class TextStream:
    """The text a streaming sequence hands out as it is generated, in pieces (`take`, once
    per engine step). It holds back the characters a stop string could still begin in (the
    final text is cut before a stop string), so what it hands out is always the start of the
    final text; `finish` adds the rest of the final text and the finish reason."""

    def __init__(self, hold: int) -> None:
        self._hold = hold
        self._pending = ""  # text not handed out yet
        self.sent = 0  # characters handed out
        self._end: str | None = None  # set by `finish`
        self._closed = False

    def add(self, text: str) -> None:
        self._pending += text

    def finish(self, text: str, reason: str) -> None:
        """Generation ended with `text` (the final text): its rest goes out with `reason`."""
        self._pending, self._hold, self._end = text[self.sent :], 0, reason

    def take(self) -> tuple[int, str, str | None] | None:
        """(characters before it, the text, the finish reason once ended), or None when
        there is nothing to hand out."""
        cut = len(self._pending) - self._hold
        if self._closed or (cut <= 0 and self._end is None):
            return None
        out, self._pending = self._pending[: max(cut, 0)], self._pending[max(cut, 0) :]
        start, self.sent = self.sent, self.sent + len(out)
        self._closed = self._end is not None
        return start, out, self._end
