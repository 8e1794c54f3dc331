"""The engine benchmark's jobs, rows and table (no torch: the peer rows and tests use it too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HEAD = (
    "row|jobs measured|out tok|wall s|out tok/s|p50 lat s|p95 lat s|p50 TTFT s|p95 TTFT s|"
    "computed/needed pos|waste|prefix hit|engine hit/queried|share of peak"
)


@dataclass
class Job:
    seq_id: str
    system: int
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Row:
    name: str  # "<system> <tag>": the last word is the dtype tag (fp32, bf16, gptq)
    jobs: int
    wall_s: float = 0.0
    computed: int = 0  # token positions the model computed (padding, recompute); 0: unknown
    needed: int = 0  # positions the jobs needed: prompt + fed-back tokens - prefix-cache hits
    hit: float | None = None  # prefix-cache hit tokens / shareable prefix tokens
    engine_hit: str = "-"
    latency: list[float] = field(default_factory=list)  # empty: unknown
    ttft: list[float] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.name.split()[-1]

    @property
    def out_tokens(self) -> int:
        return sum(map(len, self.outputs.values()))

    @property
    def tps(self) -> float:
        return self.out_tokens / self.wall_s

    def add(self, seq_id: str, tokens: list[int], latency: float, ttft: float) -> None:
        self.outputs[seq_id] = list(tokens)
        self.latency.append(latency)
        self.ttft.append(ttft)


def table_lines(rows: list[Row], dense: int, peaks: dict[str, float]) -> list[str]:
    """The Markdown table; "-" where a row cannot tell (a peer's computed positions, latency)."""
    lines = ["| " + HEAD.replace("|", " | ") + " |", "|" + "---|" * (HEAD.count("|") + 1)]
    for r in rows:
        pct = [
            f"{np.percentile(v, q):.2f}" if v else "-"
            for v in (r.latency, r.ttft)
            for q in (50, 95)
        ]
        hit = "-" if r.hit is None else f"{r.hit:.1%}"
        cells = [r.name, str(r.jobs), str(r.out_tokens), f"{r.wall_s:.1f}", f"{r.tps:.1f}", *pct]
        if r.computed:
            cells += [f"{r.computed}/{r.needed}", f"{1 - r.needed / r.computed:.1%}"]
        else:
            cells += [f"-/{r.needed}", "-"]
        share = "-"
        if r.computed and r.tag in peaks:
            share = f"{2 * dense * r.computed / r.wall_s / 1e9 / peaks[r.tag]:.1%}"
        cells += [hit, r.engine_hit, share]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
