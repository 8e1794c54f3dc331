"""Where the cores went between two snapshots of /proc (Linux): CPU seconds of each thread of
the worker (its helper threads name themselves `inferq-...`; the engine loop is the main
thread; unnamed threads are torch's compute threads), of PostgreSQL, Redis, the benchmark's
own process (producer and stream readers) and the rest of the machine, what stayed idle, and
what the hypervisor gave other VMs ("stolen", /proc/stat's steal: a neighbour's load, which
also shows as the engine's threads waiting for each other); and how often the engine's
threads (the main thread and torch's) were preempted: taken off a core while they could run
(/proc's nonvoluntary context switches), each time a stall of the matmul its partner waits on.

Usage (from a benchmark): `before = snapshot(worker_pid)`, ..., `split(before,
snapshot(worker_pid), wall_s)` gives rows of (who, CPU seconds, share of the machine's cores
over `wall_s`); `preempted_per_s(before, after, wall_s)` the engine threads' preemptions a
second.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")
STOLEN = "stolen by the hypervisor"


@dataclass
class Snapshot:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    busy_s: float = 0.0  # every core, from /proc/stat
    idle_s: float = 0.0
    steal_s: float = 0.0
    # the worker's engine threads' nonvoluntary context switches (its main thread and every
    # thread not named `inferq-...`, as `split` counts them)
    preempted: int = 0


def _preempted(task: Path) -> int:
    for line in (task / "status").read_text().splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def stat_cpu_s(stat: Path) -> float:
    """utime + stime of a /proc/.../stat file (fields 14 and 15, after the `(comm)`): a
    process's (`/proc/<pid>/stat`) or one thread's (`/proc/<pid>/task/<tid>/stat`)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _group(pid: int, comm: str) -> str:
    if comm.startswith("postgres"):
        return "PostgreSQL"
    if comm.startswith("redis-server"):
        return "Redis"
    if pid == os.getpid():
        return "benchmark process (producer, stream readers)"
    return "rest of the machine"


def snapshot(worker_pid: int, label: str = "worker") -> Snapshot:
    """CPU seconds so far; `worker_pid`'s threads one by one under `label`."""
    snap = Snapshot()
    for task in (PROC / str(worker_pid) / "task").iterdir():
        try:
            comm, cpu = (task / "comm").read_text().strip(), stat_cpu_s(task / "stat")
        except OSError:
            continue  # the thread ended meanwhile
        helper = comm.startswith("inferq") and int(task.name) != worker_pid
        if helper:
            who = f"{label}: {comm}"
        elif int(task.name) == worker_pid:
            who = f"{label}: engine loop (main thread)"
        else:
            who = f"{label}: torch compute threads"
        snap.seconds[who] += cpu
        if not helper:  # the engine's threads
            with contextlib.suppress(OSError):
                snap.preempted += _preempted(task)
    for proc in PROC.iterdir():
        if not proc.name.isdigit() or int(proc.name) == worker_pid:
            continue
        try:
            comm, cpu = (proc / "comm").read_text().strip(), stat_cpu_s(proc / "stat")
        except OSError:
            continue
        snap.seconds[_group(int(proc.name), comm)] += cpu
    cpu = [int(v) / TICK for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    snap.idle_s = cpu[3] + cpu[4]
    snap.busy_s = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]
    snap.steal_s = cpu[7]
    return snap


def split(before: Snapshot, after: Snapshot, wall_s: float) -> list[tuple[str, float, float]]:
    """(who, CPU seconds, share of all cores over `wall_s`), the worker's threads first; "rest
    of the machine" also holds processes that ended between the snapshots."""
    cores = os.cpu_count() or 1
    used = {k: after.seconds.get(k, 0.0) - before.seconds.get(k, 0.0) for k in after.seconds}
    busy = after.busy_s - before.busy_s
    named = sum(v for k, v in used.items() if k != "rest of the machine")
    used["rest of the machine"] = max(busy - named, 0.0)
    used["idle"] = after.idle_s - before.idle_s
    used[STOLEN] = after.steal_s - before.steal_s
    order = sorted(used, key=lambda k: (":" not in k, k in ("idle", STOLEN), -used[k]))
    return [(k, used[k], used[k] / (wall_s * cores)) for k in order if used[k] >= 0.005]


def preempted_per_s(before: Snapshot, after: Snapshot, wall_s: float) -> float:
    """How often a second the worker's engine threads were taken off a core while runnable
    (threads that ended between the snapshots are not counted)."""
    return (after.preempted - before.preempted) / wall_s


def table(rows: list[tuple[str, float, float]], title: str) -> list[str]:
    lines = [f"| {title} | CPU s | share of the cores |", "|---|---|---|"]
    return lines + [f"| {who} | {s:.2f} | {share:.1%} |" for who, s, share in rows]
