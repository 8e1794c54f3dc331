"""Autoscaling simulation: the shipped KEDA ScaledObject (deploy/k8s) against fixed fleets on
synthetic arrival traces; queue wait percentiles and worker-hours (bench/autoscale_model.py).

Usage: .venv/bin/python bench/autoscale_sim.py [--mu 12.1] [--start-s 45] [--seed 0]
       [--out bench/out] [--plot docs/autoscale_sim.png]
The shipped thresholds are read from deploy/k8s/keda/keda.yaml (min/max replicas, target
waiting jobs per pod, polling interval, cooldown, scale-up and scale-down behaviour) and
deploy/k8s/base/worker.yaml (INFERQ_WAITING_ROOM, INFERQ_DRAIN_S); slots = the engine's
max_num_seqs default. A worker's service rate `--mu` (jobs/s when full) defaults to the
measured one: the service benchmark's bf16 row, 256 jobs through Redis and PostgreSQL in
21.2 s = 12.1 jobs/s on the 2-core Xeon VM (docs/benchmarks.md, 2026-12-05). Pod start
`--start-s` (45 s: container start, model load from the prepared volume, as `inferq demo`
loads it in 22 s, then readiness) and a 180 s row (a node to provision first).
Traces (seeded): bursty: 6 h of 2 jobs/s, plus bursts of 2,000-12,000 jobs within 60 s,
2 an hour on average; diurnal: 24 h, 30 jobs/s mean, rate x (1 - 0.8 cos(2 pi t / 24 h)).
Queue wait: arrival to the start of its run on a worker (Redis list and waiting room).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from autoscale_model import Policy, Result, Sim, WorkerSpec, bursty, diurnal

from inferq.params import EngineConfig

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
MU = 12.1  # jobs/s: docs/benchmarks.md, service (Redis + PostgreSQL) bf16, 256 jobs / 21.2 s
FIXED = (2, 4, 5, 6, 8, 10)


def shipped() -> tuple[Policy, dict[str, float]]:
    """The ScaledObject's thresholds and the worker's drain and waiting room, as shipped."""
    docs = list(yaml.safe_load_all((K8S / "keda" / "keda.yaml").read_text()))
    spec = next(d for d in docs if d["kind"] == "ScaledObject")["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    up_policies = {p["type"]: p["value"] for p in up["policies"]}
    (down_policy,) = down["policies"]
    assert down_policy["type"] == "Pods"
    policy = Policy(
        min_replicas=spec["minReplicaCount"],
        max_replicas=spec["maxReplicaCount"],
        target=float(spec["advanced"]["scalingModifiers"]["target"]),
        poll_s=spec["pollingInterval"],
        cooldown_s=spec["cooldownPeriod"],
        up_window_s=up["stabilizationWindowSeconds"],
        up_percent=up_policies["Percent"],
        up_pods=up_policies["Pods"],
        down_window_s=down["stabilizationWindowSeconds"],
        down_pods=down_policy["value"],
        down_period_s=down_policy["periodSeconds"],
    )
    deployment = yaml.safe_load((K8S / "base" / "worker.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    worker = {"room": float(env["INFERQ_WAITING_ROOM"]), "drain_s": float(env["INFERQ_DRAIN_S"])}
    return policy, worker


def hpa_policy(keda: Policy) -> Policy:
    """deploy/k8s/hpa-prometheus: the queue and the jobs held per pod, the same behaviour."""
    hpa = yaml.safe_load((K8S / "hpa-prometheus" / "hpa.yaml").read_text())["spec"]
    targets = {
        m[m["type"].lower()]["metric"]["name"]: float(
            m[m["type"].lower()]["target"]["averageValue"]
        )
        for m in hpa["metrics"]
    }
    return replace(
        keda,
        min_replicas=hpa["minReplicas"],
        max_replicas=hpa["maxReplicas"],
        target=targets["inferq_queue_depth"],
        held_target=targets["inferq_held_jobs"],
    )


Scenario = tuple[str, Policy | None, int, WorkerSpec]


def scenarios(policy: Policy, spec: WorkerSpec) -> list[Scenario]:
    t, hpa = int(policy.target), hpa_policy(policy)
    rows: list[Scenario] = [
        (
            f"KEDA shipped (target {t}, min {policy.min_replicas}, max {policy.max_replicas})",
            policy,
            0,
            spec,
        ),
        (f"KEDA, target {t // 4}", replace(policy, target=policy.target / 4), 0, spec),
        (f"KEDA, target {t * 4}", replace(policy, target=policy.target * 4), 0, spec),
        ("KEDA, min 0 (scale to zero)", replace(policy, min_replicas=0), 0, spec),
        ("KEDA shipped, pod start 180 s", policy, 0, replace(spec, start_s=180.0)),
        (
            "KEDA, waiting room 3.0 (the worker default)",
            policy,
            0,
            replace(spec, room=3 * spec.slots),
        ),
        (
            f"HPA on Prometheus shipped (queue {int(hpa.target)}, held "
            f"{int(hpa.held_target or 0)}/pod)",
            hpa,
            0,
            spec,
        ),
    ]
    rows += [(f"fixed {n}", None, n, spec) for n in FIXED]
    return rows


HEADER = [
    "trace",
    "fleet",
    "jobs",
    "wait p50 s",
    "p95 s",
    "p99 s",
    "max s",
    "worker-hours",
    "mean pods",
    "restarted",
]


def cells(trace: str, name: str, r: Result) -> list[str]:
    hours = r.pod_seconds / 3600
    return [
        trace,
        name,
        str(len(r.waits)),
        f"{r.pct(0.5):.2f}",
        f"{r.pct(0.95):.1f}",
        f"{r.pct(0.99):.1f}",
        f"{max(r.waits):.0f}",
        f"{hours:.1f}",
        f"{r.pod_seconds / r.horizon_s:.2f}",
        str(r.restarted),
    ]


def plot(runs: dict[str, dict[str, Result]], arrivals: dict[str, list[float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(7 * len(runs), 7), sharex="col")
    for col, (trace, results) in enumerate(runs.items()):
        top, bottom = axes[0][col], axes[1][col]
        times = arrivals[trace]
        bins = int(times[-1] // 300) + 1
        top.hist(
            [t / 3600 for t in times],
            bins=bins,
            weights=[1 / 300] * len(times),
            color="tab:gray",
            alpha=0.5,
            label="arrivals, jobs/s (5-min bins)",
        )
        top.set_ylabel("jobs/s")
        top.set_title(f"{trace}")
        top.legend(loc="upper left", fontsize=8)
        for prefix, color in (("KEDA shipped (", "tab:blue"), ("HPA on Prometheus", "tab:green")):
            name = next(n for n in results if n.startswith(prefix))
            line = results[name].timeline
            bottom.step(
                [x[0] / 3600 for x in line],
                [x[1] for x in line],
                where="post",
                label=f"pods: {name}",
                color=color,
                linewidth=1,
            )
        line = results[next(n for n in results if n.startswith("KEDA shipped ("))].timeline
        queue = bottom.twinx()
        queue.plot(
            [x[0] / 3600 for x in line],
            [x[3] for x in line],
            color="tab:red",
            linewidth=0.5,
            label="waiting in Redis",
        )
        queue.set_ylabel("jobs waiting in Redis (shipped KEDA)", color="tab:red")
        bottom.set_ylabel("pods")
        bottom.set_xlabel("hours")
        bottom.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mu", type=float, default=MU, help="jobs/s of one full worker")
    parser.add_argument("--start-s", type=float, default=45.0, help="pod creation to ready")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG here")
    args = parser.parse_args()
    policy, worker = shipped()
    slots = EngineConfig().max_num_seqs
    spec = WorkerSpec(
        mu=args.mu,
        slots=slots,
        room=round(slots * worker["room"]),
        start_s=args.start_s,
        drain_s=worker["drain_s"],
    )
    traces = {
        "bursty": (bursty(6, 2.0, 2.0, (2000, 12000), 60.0, args.seed), 6 * 3600.0),
        "diurnal": (diurnal(24, 30.0, 0.8, args.seed), 24 * 3600.0),
    }
    print(f"policy {asdict(policy)}\nworker {asdict(spec)}", flush=True)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    runs: dict[str, dict[str, Result]] = {}
    for trace, (arrivals, horizon) in traces.items():
        runs[trace] = {}
        for name, pol, fixed, wspec in scenarios(policy, spec):
            t0 = time.perf_counter()
            result = Sim(wspec, pol, fixed, args.seed).run(arrivals, horizon)
            runs[trace][name] = result
            lines.append("| " + " | ".join(cells(trace, name, result)) + " |")
            print(lines[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (args.out / "autoscale_sim.md").write_text(text)
    summary = {
        t: {
            n: {"p50": r.pct(0.5), "p95": r.pct(0.95), "worker_hours": r.pod_seconds / 3600}
            for n, r in rs.items()
        }
        for t, rs in runs.items()
    }
    (args.out / "autoscale_sim.json").write_text(json.dumps(summary, indent=1))
    if args.plot:
        plot(runs, {t: a for t, (a, _) in traces.items()}, args.plot)
    print(text)


if __name__ == "__main__":
    main()
