"""Plot an engine benchmark table (`engine_bench.md`) as a PNG: throughput and TTFT per row.
Colour by dtype tag (fp32 blue, bf16 orange, gptq green, gptq-sym olive); peer engines (vLLM,
llama.cpp) hatched and paler; a "-" cell (a peer's unknown TTFT) draws no bar.

Usage: python bench/plot.py bench/out/engine_bench.md docs/engine_bench.png
"""

from __future__ import annotations

import sys
from pathlib import Path

COLORS = {"fp32": "tab:blue", "bf16": "tab:orange", "gptq": "tab:green", "gptq-sym": "tab:olive"}
PEERS = ("vllm", "llama")  # row-name prefixes of the peer engines (bench/peers/rows.py)


def number(cell: str) -> float:
    return float("nan") if cell in ("-", "\u2013", "") else float(cell)


def read_table(md: Path) -> list[dict[str, str]]:
    """Rows of the first Markdown table in `md`, keyed by header."""
    lines = [ln for ln in md.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        for ln in lines[2:]
    ]


def plot_table(md: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_table(md)
    names = [f"{r['row']}\n({r['jobs measured']} jobs)" for r in rows]
    fig, (tps, ttft) = plt.subplots(1, 2, figsize=(15, 5))
    colors = [COLORS.get(r["row"].split()[-1], "tab:gray") for r in rows]
    bars = tps.bar(names, [number(r["out tok/s"]) for r in rows], color=colors)
    for bar, r in zip(bars, rows, strict=True):
        if r["row"].startswith(PEERS):
            bar.set(hatch="//", alpha=0.55, edgecolor="black")
    tps.bar_label(bars, fmt="%.1f")
    tps.set_ylabel("output tokens/s (higher is better)")
    width, xs = 0.4, range(len(rows))
    ttft.bar(
        [x - width / 2 for x in xs],
        [number(r["p50 TTFT s"]) for r in rows],
        width,
        label="p50",
        color="tab:gray",
    )
    ttft.bar(
        [x + width / 2 for x in xs],
        [number(r["p95 TTFT s"]) for r in rows],
        width,
        label="p95",
        color="black",
    )
    ttft.set_xticks(list(xs), names)
    ttft.set_ylabel("time to first token, s (lower is better)")
    ttft.legend()
    for ax in (tps, ttft):
        ax.tick_params(axis="x", labelsize=6, labelrotation=45)
    fig.suptitle(
        "SmolLM2-135M, 2 CPU cores, fp32 (blue), bf16 (orange), GPTQ (green): HF generate "
        "vs inferq; peer engines hatched"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    plot_table(Path(sys.argv[1]), Path(sys.argv[2]))
