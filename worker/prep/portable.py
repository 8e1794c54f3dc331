"""Portable GPTQ quantize configs: say `desc_act: false` where act-order changed nothing.

Act-order with static groups (the default recipe) fixes each group's columns before the
reordering, so every layer's `g_idx` is trivial (input i in group i // group_size) and the
weights are stored in plain order; gptqmodel still writes `desc_act: true`, which engines
without act-order kernels refuse (vLLM CPU 0.32: "group activation ordering ... is no longer
supported"). With a trivial `g_idx` both values describe the same weights (a loader may ignore
`g_idx` under `desc_act: false`; here it equals the default anyway), so the config is rewritten
to the one every engine reads. A real permutation (act-order without static groups) is left
as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from worker.engine.loading import dynamic_override, quantize_config

CONFIG_FILES = ("config.json", "quantize_config.json")


def trivial_act_order(path: Path) -> bool:
    """Whether every quantized layer's `g_idx` in `path` is i // its group size."""
    from safetensors import safe_open

    qc = quantize_config(path)
    if qc is None:
        raise ValueError(f"{path} has no GPTQ quantize config")
    layers = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                if not key.endswith(".g_idx"):
                    continue
                layers += 1
                override = dynamic_override(qc.get("dynamic"), key.removesuffix(".g_idx"))
                group = int((override or {}).get("group_size", qc.get("group_size", -1)))
                g_idx = f.get_tensor(key).long()
                plain = torch.arange(len(g_idx))
                expected = torch.zeros_like(plain) if group == -1 else plain // group
                if not torch.equal(g_idx, expected):
                    return False
    return layers > 0


def settle_act_order(path: Path) -> bool:
    """Rewrite `desc_act: true` to false in `path`'s quantize configs when act-order left the
    weights in plain order; returns whether a config changed."""
    qc = quantize_config(path)
    if qc is None or not qc.get("desc_act") or not trivial_act_order(path):
        return False
    changed = False
    for name in CONFIG_FILES:
        file = path / name
        if not file.is_file():
            continue
        config = json.loads(file.read_text())
        target = config.get("quantization_config") if name == "config.json" else config
        if target and target.get("desc_act"):
            target["desc_act"] = False
            _write_json(file, config)
            changed = True
    return changed


def _write_json(file: Path, data: dict[str, Any]) -> None:
    """`data` into `file` atomically (a reader sees the old or the new file, never half)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}-", dir=file.parent)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
    os.chmod(tmp, file.stat().st_mode)
    os.replace(tmp, file)
