"""Service rows only, back to back: the same work (bench/service_bench.py's service row) run by
workers from one or more checkouts, in the order given, to compare worker versions (or to see
how much identical rows differ on this machine).

Usage: .venv/bin/python bench/service_ab.py [--dtype bfloat16] [--order a,b,b,a]
       [--checkout a=/path/to/inferq --checkout b=.] [--env b=INFERQ_X=1] [--out bench/out]
Each name in `--order` is a `--checkout` name (default: one checkout, "this", the one this
script is in); `--env name=KEY=VALUE` sets a variable for that name's workers only (a
checkout may be named twice, `--checkout a=. --checkout b=.`, to compare settings).
Per row: out tok/s, the CPU seconds of the worker's engine threads (torch's
threads and the engine loop: the same work whatever the version, so more means they waited
for each other), how often a second they were preempted (taken off a core while runnable: by
a helper, PostgreSQL, Redis, the benchmark or the rest of the machine) and the CPU seconds of
the rest (bench/cpu_split.py); then each variant's mean.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from service_bench import rate, service_row, workload  # bench/, beside this script

ENGINE = ("torch compute threads", "engine loop (main thread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--order", default="this,this,this,this")
    parser.add_argument("--checkout", action="append", default=[], help="name=path")
    parser.add_argument("--env", action="append", default=[], help="name=KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    checkouts: dict[str, Path | None] = {"this": None}
    for item in args.checkout:
        name, _, path = item.partition("=")
        checkouts[name] = Path(path).resolve()
    envs: dict[str, dict[str, str]] = {}
    for item in args.env:
        name, _, assignment = item.partition("=")
        key, _, value = assignment.partition("=")
        envs.setdefault(name, {})[key] = value
    order = args.order.split(",")
    unknown = set(order) - set(checkouts)
    assert not unknown, f"--order names without a --checkout: {sorted(unknown)}"
    args.out.mkdir(parents=True, exist_ok=True)
    jobs, _, codec = workload(256, 0, 128)
    rates: dict[str, list[float]] = {name: [] for name in dict.fromkeys(order)}
    head = "| row | out tok/s | engine threads CPU s | engine threads preempted /s |"
    print(f"{head} the rest, CPU s ({args.dtype}) |")
    print("|---|---|---|---|---|")
    for n, name in enumerate(order, 1):
        row = service_row(
            f"{name} ({n})",
            args.dtype,
            jobs,
            codec.messages,
            args.out,
            checkout=checkouts[name],
            worker_env=envs.get(name),
        )
        engine = sum(s for who, s, _ in row.cpu if who.endswith(ENGINE))
        rest = ", ".join(
            f"{who.split(': ')[-1]} {s:.2f}" for who, s, _ in row.cpu if not who.endswith(ENGINE)
        )
        rates[name].append(rate(row))
        at = time.strftime("%H:%M:%S")
        cells = f"{rate(row):.1f} | {engine:.1f} | {row.preempted_per_s:.0f} | {rest}"
        print(f"| {row.name}, {at} | {cells} |", flush=True)
    for name, got in rates.items():
        print(f"{name}: mean {statistics.mean(got):.1f} out tok/s over {len(got)} rows")


if __name__ == "__main__":
    main()
