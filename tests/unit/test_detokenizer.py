"""Incremental detokenization and the stop-string watch over UTF-8 bytes (one token = one
byte, decoded as a byte-level tokenizer does): held-back characters, stops across tokens, and
a decode whose size stays bounded whatever the bytes. The real tokenizer's cases are in
tests/engine/test_stop_strings.py."""

from __future__ import annotations

import pytest

from worker.engine.detokenizer import (
    MAX_HELD,
    REPLACEMENT,
    IncrementalDetokenizer,
    StopWatch,
    find_stop,
)


class ByteDecoder:
    """Token ids are `width` bytes each (big-endian); records the longest list it decoded."""

    def __init__(self, width: int = 1) -> None:
        self.width, self.longest = width, 0

    def __call__(self, ids: list[int]) -> str:
        self.longest = max(self.longest, len(ids))
        data = b"".join(i.to_bytes(self.width) for i in ids)
        return data.decode("utf-8", errors="replace")


def _pushes(data: bytes) -> list[str]:
    detokenizer = IncrementalDetokenizer(ByteDecoder())
    return [detokenizer.push(b) for b in data]


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world. bye\n", (".", "\n"), 11),
        ("hello world. bye\n", ["\n", "."], 11),
        ("hello world. bye\n", ["bye", "world"], 6),
        ("abcabc", ["c", "bc"], 1),
        ("hello", ["x"], None),
        ("hello", [], None),
        ("hello", ["hello"], 0),
    ],
)
def test_find_stop_earliest(text: str, stops: list[str], expected: int | None) -> None:
    assert find_stop(text, stops) == expected


def test_a_character_shows_when_its_last_byte_arrives() -> None:
    text = "a😀b你"
    pushes = _pushes(text.encode())
    assert pushes == ["a", "", "", "", "😀", "b", "", "", "你"]
    assert "".join(pushes) == text


def test_text_before_an_incomplete_character_shows_at_once() -> None:
    """A token holding "x" and the first byte of "é" shows "x" at that token."""
    detokenizer = IncrementalDetokenizer(ByteDecoder(width=2))
    assert detokenizer.push(int.from_bytes(b"x\xc3")) == "x"
    assert detokenizer.push(int.from_bytes(b"\xa9y")) == "éy"


def test_broken_bytes_cost_no_more_than_text() -> None:
    """Bytes that never make a character are let through after MAX_HELD tokens: the decoded
    window stays bounded and the text is still the whole decode."""
    data = b"ok" + b"\x80" * 500 + b"\xf0\x9f" * 300 + b"end"
    decode = ByteDecoder()
    detokenizer = IncrementalDetokenizer(decode)
    text = "".join(detokenizer.push(b) for b in data)
    assert text == data.decode("utf-8", errors="replace")
    assert REPLACEMENT in text and decode.longest <= 2 * MAX_HELD


@pytest.mark.parametrize(
    ("text", "stops", "stop_at"),
    [
        ("hello world", ["lo w"], "hello w"),  # across tokens
        ("hello world", ["h"], "h"),  # the very first token
        ("hello world", ["world", "o"], "hello"),  # the first one to appear stops
        ("say 😀 now", ["😀"], "say 😀"),  # a character of four tokens
        ("abcdef", ["x", "def", "zz"], "abcdef"),
        ("abcdef", ["efg"], None),
    ],
)
def test_stop_watch_stops_at_the_token_completing_a_stop(
    text: str, stops: list[str], stop_at: str | None
) -> None:
    watch, detokenizer = StopWatch(stops), IncrementalDetokenizer(ByteDecoder())
    data = text.encode()
    hits = [n for n, b in enumerate(data, 1) if watch.see(detokenizer.push(b))]
    assert hits[:1] == ([len(stop_at.encode())] if stop_at else [])
