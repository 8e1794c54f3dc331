"""What a co-located process costs the engine: engine-alone rows (bench/service_bench.py's,
a fresh engine each, the service benchmark's jobs) alternated with rows during which a
synthetic load runs beside them: a process that spins `burst` ms every `period` ms at a
niceness, about what the service's helpers, PostgreSQL, Redis and a producer do (short CPU
bursts woken by I/O). Per loaded row: out tok/s, the load's CPU s (over the row and its
engine's loading), the engine's loss against the mean of the unloaded rows before and after
it (the VM drifts ±5 % over minutes), and the engine core-seconds lost per CPU second of
load (the engine's two threads run in lockstep: a core taken from one stalls the other too).

Usage: .venv/bin/python bench/contention_bench.py [--dtype bfloat16]
       [--loads 0.5/10/10,0.5/10/10,0.5/10/10] (burst ms / period ms / niceness, each
       run between unloaded rows; the VM drifts ±5 % between rows, so repeat a load)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def spin(burst_ms: float, period_ms: float, nice: int) -> None:
    """The load: `burst_ms` of spinning every `period_ms`, at niceness `nice`, until killed."""
    os.nice(nice)
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < burst_ms / 1000:
            pass
        time.sleep(period_ms / 1000)


def main() -> None:
    if sys.argv[1:2] == ["--spin"]:
        return spin(float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--loads", default="0.5/10/10,0.5/10/10,0.5/10/10")
    args = parser.parse_args()
    # bench/, beside this script; not imported for --spin (torch would load in the load)
    from service_bench import engine_row, rate, workload
    from service_harness import proc_cpu_s

    jobs, _, _ = workload(256, 0, 128)
    cores = os.cpu_count() or 1
    rows = [""]  # no load first, then each load and an unloaded row after it
    for load in args.loads.split(","):
        rows += [load, ""]
    free: list[float] = []
    loaded: list[tuple[str, float, float, int]] = []  # load, rate, its share, row index
    print("| row | load (burst ms / period ms / niceness) | out tok/s | load CPU s |")
    print("|---|---|---|---|")
    for n, load in enumerate(rows, 1):
        proc = None
        if load:
            proc = subprocess.Popen([sys.executable, __file__, "--spin", *load.split("/")])
            time.sleep(1.0)  # started, spinning
        t0, used0 = time.monotonic(), proc_cpu_s(proc.pid) if proc else 0.0
        row = engine_row(f"engine alone ({n})", args.dtype, jobs)
        used = proc_cpu_s(proc.pid) - used0 if proc else 0.0
        if proc is not None:
            proc.kill()
            proc.wait()
            share = used / (cores * (time.monotonic() - t0))
            loaded.append((load, rate(row), share, len(free)))  # between free[i-1] and free[i]
        else:
            free.append(rate(row))
        at = time.strftime("%H:%M:%S")
        print(f"| {n}, {at} | {load or 'none'} | {rate(row):.1f} | {used:.2f} |", flush=True)
    print(
        f"\n| load | loss | load's share of the {cores} cores | engine core-s lost per load CPU s |"
    )
    print("|---|---|---|---|")
    for load, got, share, i in loaded:
        loss = 1 - got / statistics.mean(free[i - 1 : i + 1])  # against the rows beside it
        print(f"| {load} | {100 * loss:.1f} % | {100 * share:.1f} % | {loss / share:.2f} |")


if __name__ == "__main__":
    main()
