"""deploy/k8s, checked offline: `kubectl kustomize` renders every variant (KEDA on the Redis
lists, KEDA with Prometheus, the plain HPA on Prometheus), every object validates against the
vendored strict schemas (deploy/k8s/schemas: Kubernetes and KEDA), and the facts that cross
files hold: the grace period outlasts the drain, the probes hit paths the worker serves, the
ScaledObject counts exactly the Redis lists a job can wait on, the autoscalers read metrics
the worker exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from api_client.wire import PRIORITY_STEPS
from inferq.settings import DEFAULT_QUEUE, Settings
from worker.broker.layout import queue_key
from worker.service.metrics import HealthServer, Metrics

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VARIANTS = {"keda": K8S, "hpa": K8S / "hpa-prometheus", "keda-prom": K8S / "keda-prometheus"}
SCHEMAS = sorted((K8S / "schemas").glob("*.json"))
DRAIN_MARGIN_S = 10  # writing what finished and handing the rest back, after the drain


def _render(path: Path) -> list[dict[str, Any]]:
    exe = shutil.which("kubectl")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: deploy/k8s cannot be rendered")
        pytest.skip("kubectl is not installed")
    out = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(VARIANTS[request.param])


@pytest.fixture(scope="module")
def keda() -> list[dict[str, Any]]:
    return _render(VARIANTS["keda"])


@pytest.fixture(scope="module")
def hpa() -> list[dict[str, Any]]:
    return _render(VARIANTS["hpa"])


def _validator(obj: dict[str, Any]) -> jsonschema.Draft202012Validator:
    defs: dict[str, Any] = {}
    for path in SCHEMAS:
        defs.update(json.loads(path.read_text())["$defs"])
    key = f"kind:{obj['apiVersion']}/{obj['kind']}"
    assert key in defs, f"no vendored schema for {key}: add it to deploy/k8s/schemas"
    pointer = key.replace("~", "~0").replace("/", "~1")  # JSON pointer escaping
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{pointer}", "$defs": defs})


def _errors(obj: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator(obj).iter_errors(obj)
    ]


WORKER, GATEWAY = "inferq-worker", "inferq-gateway"


def _one(objects: list[dict[str, Any]], kind: str, name: str = WORKER) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def _worker(
    objects: list[dict[str, Any]], name: str = WORKER
) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = _one(objects, "Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- schemas -----------------------------------------------------------------------------


def test_every_rendered_object_validates_against_its_schema(objects) -> None:
    assert {o["kind"] for o in objects} >= {"Deployment", "PodDisruptionBudget", "Job"}
    for obj in objects:
        assert not _errors(obj), (obj["kind"], _errors(obj))


def test_the_example_secret_validates_and_holds_every_key_the_manifests_read(keda, hpa) -> None:
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert not _errors(secret)
    read = set()
    for obj in keda + hpa:
        text = json.dumps(obj)
        for ref in _find(obj, "secretKeyRef"):
            assert ref["name"] == secret["metadata"]["name"], text
            read.add(ref["key"])
        if obj["kind"] == "TriggerAuthentication":
            read |= {r["key"] for r in obj["spec"]["secretTargetRef"]}
    assert read == set(secret["stringData"])


def test_the_schemas_are_strict_enough_to_catch_a_typo(keda) -> None:
    deployment, _ = _worker(keda)
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    assert any("terminationGracePeriod" in e for e in _errors(typo))
    scaled = json.loads(json.dumps(_one(keda, "ScaledObject")))
    scaled["spec"]["minReplicas"] = 1  # the HPA's spelling, not KEDA's
    assert _errors(scaled)
    del scaled["spec"]["minReplicas"]
    scaled["spec"]["triggers"][0].pop("metadata")
    assert _errors(scaled)


def _find(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        return ([node[key]] if key in node else []) + [
            x for v in node.values() for x in _find(v, key)
        ]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, key)]
    return []


# -- the worker Deployment ---------------------------------------------------------------


def test_the_grace_period_outlasts_prestop_plus_drain(objects) -> None:
    deployment, container = _worker(objects)
    pod = deployment["spec"]["template"]["spec"]
    drain = float(_env(container)["INFERQ_DRAIN_S"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + DRAIN_MARGIN_S


def test_every_inferq_variable_is_a_setting(objects) -> None:
    for container in _find(objects, "containers") + _find(objects, "initContainers"):
        for c in container:
            for name in _env(c) if "env" in c else {}:
                if name.startswith("INFERQ_"):
                    field = name.removeprefix("INFERQ_").lower()
                    assert field in Settings.model_fields, name


def test_probes_hit_paths_the_worker_serves_on_its_metrics_port(objects) -> None:
    _, container = _worker(objects)
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == int(_env(container)["INFERQ_METRICS_PORT"])
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {p["port"] for p in probes.values()} == {"metrics"}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    ready = [True]
    server = HealthServer(Metrics(), lambda: True, lambda: ready[0], port=0, host="127.0.0.1")
    server.start()
    try:
        for probe in probes.values():
            assert _get(server.port, probe["path"]) == 200
        ready[0] = False  # a worker that is not ready must read as such
        assert _get(server.port, probes["readinessProbe"]["path"]) == 503
    finally:
        server.stop()


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_each_pdb_selects_its_own_pods(objects) -> None:
    for name in (WORKER, GATEWAY):
        deployment, _ = _worker(objects, name)
        pdb = _one(objects, "PodDisruptionBudget", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        others = [o for o in objects if o["kind"] == "Deployment" and o is not deployment]
        for other in others:  # and no other Deployment's
            own = other["spec"]["template"]["metadata"]["labels"]
            assert not pdb["spec"]["selector"]["matchLabels"].items() <= own.items()


def test_the_gateway_probes_a_path_it_serves_and_scales_apart(objects) -> None:
    from gateway.routes import router

    deployment, container = _worker(objects, GATEWAY)
    assert container["args"][0] == "serve"
    port = int(container["args"][container["args"].index("--port") + 1])
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "http"] == [port]
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] in {r.path for r in router.routes}
    assert "tcpSocket" in container["livenessProbe"]  # an outage must not restart it
    pod = deployment["spec"]["template"]["spec"]
    assert (
        pod["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    service = _one(objects, "Service", GATEWAY)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    autoscaler = _one(objects, "HorizontalPodAutoscaler", GATEWAY)
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == GATEWAY


# -- autoscalers -------------------------------------------------------------------------


def test_the_scaledobject_counts_exactly_the_queue_lists(keda) -> None:
    deployment, _ = _worker(keda)
    scaled = _one(keda, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = spec["triggers"]
    lists = {t["metadata"]["listName"] for t in triggers}
    assert lists == {queue_key(DEFAULT_QUEUE, p) for p in PRIORITY_STEPS}
    assert len(lists) == len(triggers) == len(PRIORITY_STEPS)
    modifiers = spec["advanced"]["scalingModifiers"]
    terms = [t.strip() for t in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(t["name"] for t in triggers)  # a sum over every list
    assert modifiers["metricType"] == "AverageValue"
    auth = _one(keda, "TriggerAuthentication", "inferq-redis")["metadata"]["name"]
    for t in triggers:
        assert t["type"] == "redis" and t["authenticationRef"]["name"] == auth
        assert t["metadata"]["listLength"] == modifiers["target"]


def _hpa_targets(hpa: list[dict[str, Any]]) -> dict[str, str]:
    metrics = _one(hpa, "HorizontalPodAutoscaler")["spec"]["metrics"]
    return {
        m[m["type"].lower()]["metric"]["name"]: m[m["type"].lower()]["target"]["averageValue"]
        for m in metrics
    }


def test_keda_with_prometheus_asks_for_what_the_hpa_variant_asks_for(keda, hpa) -> None:
    """max(waiting / the lists' target, held / the HPA's held target): the same two wishes."""
    base = _one(keda, "ScaledObject")["spec"]
    spec = _one(_render(VARIANTS["keda-prom"]), "ScaledObject")["spec"]
    modifiers = spec["advanced"]["scalingModifiers"]
    match = re.fullmatch(r"max\(\((.+)\) / (\d+), (\w+) / (\d+)\)", modifiers["formula"])
    assert match, modifiers["formula"]
    lists, per_pod, held, held_per_pod = match.groups()
    assert lists == base["advanced"]["scalingModifiers"]["formula"]
    assert per_pod == base["advanced"]["scalingModifiers"]["target"]
    assert modifiers["target"] == "1" and modifiers["metricType"] == "AverageValue"
    (prom,) = [t for t in spec["triggers"] if t["name"] == held]
    assert prom["type"] == "prometheus" and prom["metadata"]["threshold"] == held_per_pod
    assert held_per_pod == _hpa_targets(hpa)["inferq_held_jobs"]
    assert per_pod == _hpa_targets(hpa)["inferq_queue_depth"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert re.match(r"sum\((\w+)\{", prom["metadata"]["query"]).group(1) in exported


def test_the_hpa_reads_metrics_the_worker_exports(hpa) -> None:
    deployment, _ = _worker(hpa)
    assert not [o for o in hpa if o["apiVersion"].startswith("keda.sh/")]
    autoscaler = _one(hpa, "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    names = {m[m["type"].lower()]["metric"]["name"] for m in autoscaler["spec"]["metrics"]}
    exported = {m.name for m in Metrics().registry.collect()}
    assert names and names <= exported
    rules = yaml.safe_load((K8S / "hpa-prometheus" / "prometheus-adapter-rules.yaml").read_text())
    served = {r["name"]["as"] for r in rules["rules"] + rules["externalRules"]}
    assert names <= served
    for rule in rules["externalRules"]:  # every worker reports the same queue depth
        assert rule["metricsQuery"].startswith("max(")
