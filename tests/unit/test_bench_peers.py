"""The engine benchmark's peer plumbing, without the peers: EOS stripping, result JSON to table
rows, "-" cells, the verdict lines (bench/peers/; vLLM and llama.cpp are never installed here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]

from benchrow import Job, Row, table_lines  # noqa: E402
from peers import rows as peer_rows_module  # noqa: E402
from peers.peerio import JobResult, strip_eos, write_result  # noqa: E402
from peers.rows import (  # noqa: E402
    PORTABLE_TAG,
    parse_peers,
    peer_runs,
    peer_verdicts,
    portable_gptq,
    result_row,
)


def test_strip_eos_cuts_at_the_first_eos() -> None:
    assert strip_eos([5, 6, 2], {2}) == ([5, 6], True)
    assert strip_eos([5, 2, 7, 2], {2, 9}) == ([5], True)
    assert strip_eos([5, 6], {2}) == ([5, 6], False)


def test_result_json_becomes_a_row(tmp_path: Path) -> None:
    jobs = [Job("a", 0, [1] * 10, 4), Job("b", 0, [1] * 12, 4)]
    write_result(
        tmp_path / "r.json",
        "peer",
        "settings",
        3.0,
        2.0,
        [
            JobResult("b", [7, 8, 9, 10], False, 8, 1.5, 0.5),
            JobResult("a", [7], True, 0, 1.0, 0.25),
        ],
    )
    row = result_row("vllm-cpu-apc fp32", json.loads((tmp_path / "r.json").read_text()), jobs, 16)
    assert row.outputs == {"a": [7], "b": [7, 8, 9, 10]}
    assert (row.out_tokens, row.tps, row.hit) == (5, 2.5, 0.5)
    assert row.needed == (10 + 1 + 1 - 1 - 0) + (12 + 4 + 0 - 1 - 8)  # prompt + fed - cached
    assert row.latency == [1.0, 1.5] and row.ttft == [0.25, 0.5]  # in the jobs' order
    cells = table_lines([row], dense=100, peaks={"fp32": 1.0})[2].split(" | ")
    assert cells[9:14] == ["-/18", "-", "50.0%", "-", "- |"]  # computed, waste, share unknown


def test_unknown_latency_prints_dashes() -> None:
    row = Row("llama-server-16slot bf16", 1, 1.0, outputs={"a": [1, 2]})
    assert table_lines([row], 1, {})[2].split(" | ")[5:9] == ["-"] * 4


def test_peer_verdicts_compare_with_the_engine_row() -> None:
    engine = Row("engine-prefix-cache fp32", 2, 1.0, outputs={"a": [1, 2], "b": [3]})
    vllm = Row("vllm-cpu-apc fp32", 2, 1.5, outputs={"a": [1, 2], "b": [4]})
    lines = peer_verdicts({r.name: r for r in (engine, vllm)}, ["fp32", "bf16"])
    assert lines == [
        "- greedy tokens equal to engine-prefix-cache fp32: vllm-cpu-apc fp32 1/2",
        "- engine-prefix-cache fp32 vs vllm-cpu-apc fp32: 1.50x (target ≥1.2x: MET)",
    ]


def test_parse_peers() -> None:
    assert parse_peers("none") == []


def test_portable_gptq_rows_need_vllm_and_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(peer_rows_module, "VLLM_PY", tmp_path / "no-vllm" / "python")
    monkeypatch.setattr(peer_rows_module, "LLAMA_SERVER", tmp_path / "no-llama")
    assert parse_peers("auto") == []  # nothing installed: no peer rows at all
    assert portable_gptq([], tmp_path) == (None, "")  # and no GPTQ peer row, nothing to say
    assert portable_gptq(["llama"], tmp_path) == (None, "")
    missing, why = portable_gptq(["vllm"], tmp_path / "gptq-sym")
    assert missing is None and "no checkpoint at" in why and "make peers" in why
    (tmp_path / "config.json").write_text("{}")
    assert portable_gptq(["vllm"], tmp_path) == (tmp_path, "")


def test_portable_gptq_runs_vllm_alone_in_bf16(tmp_path: Path) -> None:
    runs = peer_runs(["vllm", "llama"], "bfloat16", PORTABLE_TAG, tmp_path / "w.json")
    assert [r.name for r in runs] == [f"vllm-cpu-apc {PORTABLE_TAG}"]  # no GGUF of it
    assert runs[0].cmd[-2:] == ["--dtype", "bfloat16"]


def test_portable_gptq_verdict_has_no_target() -> None:
    engine = Row(f"engine-prefix-cache {PORTABLE_TAG}", 2, 2.0, outputs={"a": [1], "b": [3]})
    vllm = Row(f"vllm-cpu-apc {PORTABLE_TAG}", 2, 1.0, outputs={"a": [1], "b": [4]})
    lines = peer_verdicts({r.name: r for r in (engine, vllm)}, [PORTABLE_TAG])
    assert lines == [
        f"- greedy tokens equal to {engine.name}: {vllm.name} 1/2",
        f"- {engine.name} vs {vllm.name}: 0.50x",
    ]
