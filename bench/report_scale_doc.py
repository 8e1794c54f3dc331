"""The generated part of docs/reporting-scale.md, from bench/report_scale.py's figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from report_scale_sql import MARK, TARGET_MS  # bench/, beside this script


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def cell(r: dict[str, Any]) -> str:
    over = " **over**" if r["median"] >= TARGET_MS else ""
    ms = [f"{v:,.1f}" if v < 10 else f"{v:,.0f}" for v in (r["median"], r["max"])]
    return f"{ms[0]} / {ms[1]}{over}"


def write_doc(path: Path, info: dict[str, Any]) -> None:
    load = info["load"]
    md = [
        MARK[0],
        f"Run: {info['when']}, {info['jobs']:,} jobs"
        + (
            f", loaded in {load['total_s']:.0f} s (inserts {load['insert_s']:.0f} s, then VACUUM "
            "ANALYZE)."
            if load
            else " (`--skip-load`: the kept database)."
        ),
        "",
        "| machine | |",
        "|---|---|",
    ]
    md += [f"| {k} | {v} |" for k, v in info["machine"].items()]
    labels = [label for label, _, _ in info["phases"]]
    md += [
        "",
        "Timings: median / max ms of 5 warm runs (after 1 untimed); **over** = median "
        "at or over 2 s. Phases are cumulative: "
        + "; ".join(f"{label} ({setup:.1f} s to set up)" for label, setup, _ in info["phases"])
        + ".",
        "",
        "| query | rows | " + " | ".join(labels) + " |",
        "|---|---:|" + "---:|" * len(labels),
    ]
    for k, r in enumerate(info["phases"][0][2]):
        md.append(
            f"| {r['name']} | {r['rows']} | "
            + " | ".join(cell(p[2][k]) for p in info["phases"])
            + " |"
        )
    ro = info["rollup"]
    md += [
        "",
        f"Rollup prototype: `usage_daily_rollup` ({ro['rows']:,} rows) filled from "
        f"job_metrics by one INSERT ... SELECT in {ro['fill_s']:.1f} s. Write path: "
        f"{len(ro['upserts'])} transactions each change the facts of 32 recent jobs (status, "
        "day, tokens, cost), retracting their rows from the rollup before (sign -1) and "
        f"adding them after (+1): {statistics.median(ro['upserts']):.2f} ms median, "
        f"{max(ro['upserts']):.2f} ms max for the two upserts; rollup rows differing from a "
        f"fresh aggregate after: {ro['drift']}.",
        "",
        "| query | rows | median / max ms |",
        "|---|---:|---:|",
    ]
    md += [f"| {r['name']} | {r['rows']} | {cell(r)} |" for r in ro["timed"]]
    if ret := info.get("retention"):
        per = [s for _, s in ret["batches"]]
        md += [
            "",
            f"### Retention: the oldest 30 days, batches of {ret['batch']:,}",
            "",
            f"{ret['deleted']:,} jobs deleted (their job_metrics and results rows by ON "
            f"DELETE CASCADE) in {len(per)} batches, {sum(per):.1f} s: per batch median "
            f"{statistics.median(per):.2f} s, min {min(per):.2f} s, max {max(per):.2f} s. "
            f"Plain VACUUM of the three tables after: {ret['vacuum_s']:.1f} s. Sizes in MiB,"
            " heap / indexes (total with TOAST):",
            "",
            "| step | " + " | ".join(ret["steps"][0][1]) + " | all three |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, sz in ret["steps"]:
            parts = [f"{mib(h)} / {mib(i)} ({mib(t)})" for h, i, t in sz.values()]
            md.append(f"| {label} | {' | '.join(parts)} | {mib(sum(t for *_, t in sz.values()))} |")
        md += ["", "Seconds per batch: " + ", ".join(f"{s:.2f}" for s in per)]
    md += ["", "### Plans (EXPLAIN (ANALYZE, BUFFERS); over 40 lines trimmed)"]
    plans = [(label, r) for label, _, rs in info["phases"] for r in rs if "plan" in r]
    for label, r in [*plans, *(("rollup", r) for r in ro["timed"])]:
        lines = r["plan"] if len(r["plan"]) <= 40 else [*r["plan"][:40], "  ... (trimmed)"]
        md += ["", f"**{r['name']}**, {label}", "", "```", *lines, "```"]
    text = path.read_text() if path.exists() else "# Reporting at scale\n\n"
    head, _, rest = text.partition(MARK[0])
    path.write_text(head + "\n".join([*md, MARK[1]]) + (rest.partition(MARK[1])[2] or "\n"))
