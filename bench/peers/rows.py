"""Peer rows for the engine benchmark: vLLM CPU and llama.cpp's llama-server on the same jobs.

`make peers` installs them under .peers/ (bench/peers/install.sh). Per dtype, the benchmark
writes its seeded workload (the same prompt ids and max_tokens as its own rows) to JSON, runs
bench/peers/vllm_row.py in vLLM's venv and bench/peers/llama_row.py beside a llama-server, and
turns their result JSON into table rows. A peer that fails or times out is reported in the
verdict lines and leaves no row; its log is under `<out>/peers/`. In the GPTQ section, vLLM
also runs the portable (symmetric) GPTQ checkpoint `make peers` quantizes into .peers/gptq-sym
(vLLM CPU takes no asymmetric one), beside the engine on the same checkpoint (tag `gptq-sym`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchrow import Job, Row  # bench/, on the path of the benchmark scripts
from peers.peerio import PeerJob, write_workload

HERE = Path(__file__).resolve().parent
PEERS = HERE.parents[1] / ".peers"
VLLM_PY = PEERS / "vllm" / "bin" / "python"
LLAMA_SERVER = PEERS / "bin" / "llama-server"
GGUF = {"fp32": PEERS / "gguf" / "model-f32.gguf", "bf16": PEERS / "gguf" / "model-bf16.gguf"}
GPTQ_SYM = PEERS / "gptq-sym"  # `inferq model quantize FP GPTQ_SYM --sym` (install.sh)
PORTABLE_TAG = "gptq-sym"  # the rows of both engines on that checkpoint
TIMEOUT_S = 3600  # one peer run: load + warm-up + all jobs (256 jobs: 1.5-4 min here)
SLOTS = 16
ENGINE = "engine-prefix-cache"
VLLM_ROW = "vllm-cpu-apc"
LLAMA_ROW = f"llama-server-{SLOTS}slot"
VLLM_TARGET = 1.2  # the target: the engine ≥1.2x vLLM CPU in the same dtype


@dataclass
class PeerRun:
    name: str  # the row name, "<peer> <tag>"
    cmd: list[str]
    result: Path
    log: Path


def installed() -> list[str]:
    """Peers `make peers` has installed: "vllm", "llama"."""
    found = {"vllm": VLLM_PY.exists(), "llama": LLAMA_SERVER.exists() and GGUF["fp32"].exists()}
    return [p for p, ok in found.items() if ok]


def parse_peers(value: str) -> list[str]:
    """`--peers`: "auto" (those installed), "none", or a list such as "vllm,llama"."""
    if value == "auto":
        return installed()
    if value == "none":
        return []
    wanted = value.split(",")
    if bad := [p for p in wanted if p not in ("vllm", "llama")]:
        raise SystemExit(f"--peers: unknown {bad}; use vllm, llama, auto or none")
    if missing := [p for p in wanted if p not in installed()]:
        raise SystemExit(f"--peers {missing} not installed under {PEERS}: run `make peers`")
    return wanted


def portable_gptq(peers: list[str], path: Path = GPTQ_SYM) -> tuple[Path | None, str]:
    """The portable GPTQ checkpoint both engines run when vLLM is among the peers, or None and
    why not (a verdict line; "" when vLLM is not asked for: no row, nothing to say)."""
    if "vllm" not in peers:
        return None, ""
    if not (path / "config.json").is_file():
        return None, f"- {VLLM_ROW} {PORTABLE_TAG}: no row (no checkpoint at {path}: make peers)"
    return path, ""


def peer_setup(model: str, eos_ids: list[int]) -> dict:
    """What a peer needs besides the jobs: the model dir, EOS ids, and every core it may use."""
    return {"model": model, "eos_ids": sorted(eos_ids), "threads": len(os.sched_getaffinity(0))}


def peer_runs(peers: list[str], dtype: str, tag: str, work: Path) -> list[PeerRun]:
    """The peer commands for one dtype (llama.cpp: the GGUF of that dtype, where there is one);
    results and logs go beside the workload JSON."""
    runs = []

    def add(row: str, script: list[str], *flags: str) -> None:
        name = f"{row} {tag}"
        res = work.parent / f"{name.replace(' ', '-')}.json"
        cmd = [*script, str(work), str(res), *flags]
        runs.append(PeerRun(name, cmd, res, res.with_suffix(".log")))

    if "vllm" in peers:
        add(VLLM_ROW, [str(VLLM_PY), str(HERE / "vllm_row.py")], "--dtype", dtype)
    if "llama" in peers and tag in GGUF and GGUF[tag].exists():
        add(
            LLAMA_ROW,
            [sys.executable, str(HERE / "llama_row.py")],
            "--server",
            str(LLAMA_SERVER),
            "--gguf",
            str(GGUF[tag]),
            "--slots",
            str(SLOTS),
        )
    return runs


def result_row(name: str, result: dict, jobs: list[Job], shareable: int) -> Row:
    """A table row from a peer's result JSON (computed positions unknown: 0, shown as "-")."""
    by_id = {r["seq_id"]: r for r in result["jobs"]}
    row = Row(name, len(jobs), result["wall_s"])
    cached = 0
    for j in jobs:
        r = by_id[j.seq_id]
        row.outputs[j.seq_id] = list(r["tokens"])
        cached += r["cached"]
        row.needed += len(j.prompt_ids) + len(r["tokens"]) + r["eos"] - 1 - r["cached"]
    row.hit = cached / shareable if shareable else None
    if all(by_id[j.seq_id]["latency_s"] is not None for j in jobs):
        row.latency = [by_id[j.seq_id]["latency_s"] for j in jobs]
    if all(by_id[j.seq_id]["ttft_s"] is not None for j in jobs):
        row.ttft = [by_id[j.seq_id]["ttft_s"] for j in jobs]
    return row


def peer_rows(
    peers: list[str],
    dtype: str,
    tag: str,
    jobs: list[Job],
    shareable: int,
    setup: dict,
    out: Path,
    notes: list[str],
) -> list[Row]:
    """The peers' rows for one dtype; `setup` = model dir, eos ids, threads. Failures and the
    peers' own settings go to `notes` (verdict lines)."""
    if not peers:
        return []
    out.mkdir(parents=True, exist_ok=True)
    work = out / f"workload-{tag}.json"
    write_workload(
        work,
        setup["model"],
        setup["eos_ids"],
        setup["threads"],
        [PeerJob(j.seq_id, j.prompt_ids, j.max_tokens) for j in jobs],
    )
    env = {"HF_HUB_OFFLINE": "1", **os.environ}  # local model dir: nothing to fetch
    rows = []
    for run in peer_runs(peers, dtype, tag, work):
        print(f"peer {run.name}: {' '.join(run.cmd)} (log {run.log})", flush=True)
        start = time.perf_counter()
        try:
            with run.log.open("w") as f:
                subprocess.run(
                    run.cmd,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=TIMEOUT_S,
                    env=env,
                )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            notes.append(f"- {run.name}: no row ({type(e).__name__}; log {run.log})")
            continue
        result = json.loads(run.result.read_text())
        rows.append(result_row(run.name, result, jobs, shareable))
        setup_s = time.perf_counter() - start - result["wall_s"]
        notes.append(
            f"- {run.name}: {result['system']}, {result['settings']}; start-up and "
            f"warm-up {setup_s:.0f}s, not in wall"
        )
    return rows


def is_peer(name: str) -> bool:
    return name.startswith((VLLM_ROW, LLAMA_ROW))


def same_tokens(row: Row, ref: Row) -> str:
    same = sum(row.outputs.get(s) == t for s, t in ref.outputs.items())
    return f"{same}/{len(ref.outputs)}"


def peer_verdicts(rows: dict[str, Row], tags: list[str]) -> list[str]:
    """Per dtype: greedy agreement of each peer row with the engine's prefix-cache row, and the
    engine vs vLLM target (the portable GPTQ rows: the ratio, no target)."""
    lines = []
    for tag in tags:
        ref = rows.get(f"{ENGINE} {tag}")
        peers = [r for r in rows.values() if r.tag == tag and is_peer(r.name)]
        if ref is None:
            continue
        lines += [
            f"- greedy tokens equal to {ref.name}: {r.name} {same_tokens(r, ref)}" for r in peers
        ]
        vllm = rows.get(f"{VLLM_ROW} {tag}")
        if vllm is not None:
            x = ref.tps / vllm.tps
            ok = "MET" if x >= VLLM_TARGET else "NOT MET"
            target = "" if tag == PORTABLE_TAG else f" (target ≥{VLLM_TARGET}x: {ok})"
            lines.append(f"- {ref.name} vs {vllm.name}: {x:.2f}x{target}")
    return lines
