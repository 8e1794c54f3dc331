"""The null engine: the `Engine` contract without a model (no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.engine.api import (
    Engine,
    EngineRequest,
    FinishReason,
    SamplingParams,
    run_to_completion,
)
from worker.engine.null import NULL_TOKEN, ByteCodec, NullEngine


def req(seq_id: str, n: int = 3, max_tokens: int = 4, **kw) -> EngineRequest:
    params = SamplingParams(max_tokens=max_tokens)
    return EngineRequest(seq_id=seq_id, prompt_ids=list(range(1, n + 1)), params=params, **kw)


def test_it_is_an_engine_and_imports_no_torch() -> None:
    engine = NullEngine(max_num_seqs=8)
    assert isinstance(engine, Engine)
    assert (engine.model_name, engine.max_num_seqs, engine.max_context) == ("null", 8, 1 << 20)
    assert NullEngine().max_num_seqs == 256
    code = "import sys, worker.engine.null, worker.engine.api; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_finishes_everything_queued_with_full_outputs() -> None:
    engine = NullEngine()
    assert not engine.has_work and engine.step() == []
    engine.add(req("a", n=5, max_tokens=3))
    engine.add(req("b", n=2, max_tokens=1, priority=4))
    assert engine.has_work and engine.stats().waiting == 2
    a, b = engine.step()
    assert not engine.has_work
    assert (a.seq_id, a.token_ids, a.text) == ("a", [NULL_TOKEN] * 3, "")
    assert a.finish_reason == FinishReason.LENGTH
    assert (a.prompt_tokens, a.cached_tokens, a.computed_tokens) == (5, 0, 5 + 2)
    assert (b.token_ids, b.computed_tokens) == ([NULL_TOKEN], 2)
    assert (a.batch, a.batch_size) == (b.batch, b.batch_size) == (1, 2)
    assert a.added_at <= a.admitted_at == a.first_token_at == a.finished_at
    engine.add(req("c"))
    (c,) = engine.step()
    assert (c.batch, c.batch_size) == (2, 1)
    stats = engine.stats()
    assert (stats.steps, stats.waiting, stats.running) == (2, 0, 0)
    assert stats.prefill_tokens == 5 + 2 + 3 and stats.decode_tokens == 2 + 0 + 3
    assert stats.busy_s >= 0


def test_abort_validation_and_run_to_completion() -> None:
    engine = NullEngine()
    engine.add(req("a"))
    with pytest.raises(ValueError):
        engine.add(req("a"))
    with pytest.raises(ValueError):
        engine.add(req("empty", n=0))
    with pytest.raises(ValueError):
        engine.add(req("long", max_tokens=1 << 20))
    engine.abort("a")
    engine.abort("missing")
    assert not engine.has_work and engine.step() == []
    outs = run_to_completion(engine, [req("x", max_tokens=2), req("y", max_tokens=5)])
    assert [(o.seq_id, len(o.token_ids)) for o in outs] == [("x", 2), ("y", 5)]


def test_byte_codec() -> None:
    codec = NullEngine().new_codec()
    assert isinstance(codec, ByteCodec)
    assert codec.encode("hé", None) == list("hé".encode())
    msgs = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert codec.encode(None, msgs) == list(b"a\nb")
    assert codec.decode(codec.encode("hé ok", None)) == "hé ok"
    assert codec.decode([NULL_TOKEN]) == " "
