"""The files the engine benchmark and its peer scripts exchange (stdlib only: it runs in the
peers' own environments too).

Workload JSON (written by bench/peers/rows.py):
    {"model": fp model dir, "eos_ids": [...], "threads": n,
     "jobs": [{"seq_id": str, "prompt_ids": [int], "max_tokens": int}, ...]}
Result JSON (written by a peer script):
    {"system": str, "settings": str, "load_s": float, "wall_s": float,
     "jobs": [{"seq_id": str, "tokens": [int], "eos": bool, "cached": int,
               "latency_s": float | null, "ttft_s": float | null}, ...]}
`tokens` are the generated ids without the final EOS (`eos` says whether it stopped there), as
the engine rows count them; latency and TTFT are seconds from the run's t=0 (all jobs arrive
then), null where the peer cannot tell; `wall_s` excludes model load and warm-up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class PeerJob:
    seq_id: str
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class JobResult:
    seq_id: str
    tokens: list[int]
    eos: bool
    cached: int
    latency_s: float | None = None
    ttft_s: float | None = None


def strip_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Generated ids up to the first EOS (excluded), and whether there was one."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return list(tokens[:i]), True
    return list(tokens), False


def read_workload(path: Path) -> tuple[dict[str, Any], list[PeerJob]]:
    """The workload's settings (model, eos_ids, threads) and its jobs in arrival order."""
    data = json.loads(Path(path).read_text())
    return data, [PeerJob(**j) for j in data["jobs"]]


def write_workload(
    path: Path, model: str, eos_ids: list[int], threads: int, jobs: list[PeerJob]
) -> None:
    body = {
        "model": model,
        "eos_ids": eos_ids,
        "threads": threads,
        "jobs": [asdict(j) for j in jobs],
    }
    Path(path).write_text(json.dumps(body))


def write_result(
    path: Path, system: str, settings: str, load_s: float, wall_s: float, jobs: list[JobResult]
) -> None:
    body = {
        "system": system,
        "settings": settings,
        "load_s": load_s,
        "wall_s": wall_s,
        "jobs": [asdict(j) for j in jobs],
    }
    Path(path).write_text(json.dumps(body))
