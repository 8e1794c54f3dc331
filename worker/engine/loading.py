"""Device, dtype and weights for a causal LM: plain Hugging Face directories (or hub ids)
through transformers, GPTQ checkpoints (checked first) through gptqmodel's fastest kernel.
On CPU its int4 linears are then wrapped to pick int4 or dequantize + dense per row count
(worker.engine.gptq_dispatch); on CUDA gptqmodel's kernel runs as loaded.

gptqmodel is imported lazily: it prints a banner and takes seconds to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from inferq.params import EngineConfig

CPU_BACKENDS = ("gptq_torch_aten", "gptq_torch_fused", "gptq_torch")
CUDA_BACKENDS = ("gptq_marlin", "gptq_exllama_v2", "gptq_triton", "gptq_torch")
CPU_FORMATS = ("gptq", "gptq_v2")  # packed layouts gptqmodel's CPU kernels read


class GptqCheckpointError(ValueError):
    """A GPTQ checkpoint that is broken, or does not match its own quantize config."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    dtype: torch.dtype
    kernel: str  # "dense" or the GPTQ backend that loaded it
    crossovers: dict[tuple[int, int, int], str] = field(default_factory=dict)
    # (in, out, group) -> rows from which a CPU GPTQ linear dequantizes and runs dense


def load_causal_lm(
    path: str,
    device: torch.device,
    dtype: str = "auto",
    *,
    attn_implementation: str | None = None,
    config: EngineConfig | None = None,
) -> LoadedModel:
    """Load `path` for inference on `device`, in eval mode (GPTQ kernels as `config` says)."""
    cfg = config or EngineConfig()
    hf_logging.disable_progress_bar()
    if is_gptq_dir(path):
        torch_dtype = gptq_dtype(dtype, device)
        model, kernel = load_gptq(path, device, torch_dtype, cfg.gptq_backend)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        if device.type == "cpu":
            from worker.engine.gptq_dispatch import install

            crossovers = install(model, cfg.gptq_crossover, cfg.gptq_many)
            print(f"GPTQ many-row path from (rows): {crossovers}", file=sys.stderr)
            return LoadedModel(model.eval(), torch_dtype, kernel, crossovers)
    else:
        torch_dtype, kernel = pick_dtype(dtype, device), "dense"
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra).to(device)
    model.eval()
    return LoadedModel(model, torch_dtype, kernel)


# -- GPTQ ------------------------------------------------------------------------------------


def import_gptqmodel() -> ModuleType:
    """gptqmodel, imported with its banner and log lines sent to stderr (stdout carries the
    worker's JSON logs), and its CPU pool sized so it starts on small machines."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    with contextlib.redirect_stdout(sys.stderr):
        import gptqmodel
    return gptqmodel


def is_gptq_dir(path: str | Path) -> bool:
    return quantize_config(Path(path)) is not None


def quantize_config(path: Path) -> dict[str, Any] | None:
    """The GPTQ quantize config of a model directory, or None for an unquantized one."""
    config_file = path / "config.json"
    if config_file.is_file():
        qc = json.loads(config_file.read_text()).get("quantization_config")
        if qc and str(qc.get("quant_method", "")).lower() == "gptq":
            return qc
    legacy = path / "quantize_config.json"
    if not legacy.is_file():
        return None
    qc = json.loads(legacy.read_text())
    return qc if str(qc.get("quant_method", "gptq")).lower() == "gptq" else None


def check_checkpoint(path: Path) -> dict[str, Any]:
    """Validate a GPTQ directory's tensors against its quantize config; returns the config."""
    from safetensors import safe_open

    qc = quantize_config(path)
    if qc is None:
        raise GptqCheckpointError(f"{path} has no GPTQ quantize config")
    bits, group = int(qc.get("bits", 0)), int(qc.get("group_size", -1))
    if bits not in (2, 3, 4, 8):
        raise GptqCheckpointError(f"{path}: unsupported bits {qc.get('bits')!r}")
    if group != -1 and group <= 0:
        raise GptqCheckpointError(f"{path}: invalid group_size {qc.get('group_size')!r}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GptqCheckpointError(f"{path} holds no .safetensors weights")
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        except Exception as exc:
            msg = f"{file.name} is not a readable safetensors file: {exc}"
            raise GptqCheckpointError(msg) from exc
    layers = [k.removesuffix(".qweight") for k in shapes if k.endswith(".qweight")]
    if not layers:
        raise GptqCheckpointError(f"{path} has a GPTQ config but no quantized (qweight) tensors")
    _check_head(path, layers)
    for layer in layers:
        override = dynamic_override(qc.get("dynamic"), layer) or {}
        layer_bits = int(override.get("bits", bits))
        if layer_bits not in (2, 3, 4, 8):
            raise GptqCheckpointError(f"{path}: {layer}: unsupported bits {layer_bits!r}")
        _check_layer(layer, shapes, layer_bits, int(override.get("group_size", group)))
    return qc


def _check_head(path: Path, layers: list[str]) -> None:
    """A quantized output head cannot share the input embedding's weights."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tie_word_embeddings") is True and any(n.endswith("lm_head") for n in layers):
        raise GptqCheckpointError(
            f"{path}: lm_head is quantized but config.json says tie_word_embeddings: true "
            "(a quantized head cannot share the embedding's weights; untie it or keep lm_head "
            "unquantized)"
        )


def checkpoint_format(qc: dict[str, Any]) -> str:
    """The packed layout a quantize config names (gptq: v1 zero points, stored minus one)."""
    return str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()


def dynamic_override(dynamic: dict[str, Any] | None, layer: str) -> dict[str, Any] | None:
    """A layer's per-module overrides from a quantize config's `dynamic` (gptqmodel's rule: the
    first pattern that matches, `-:` patterns mean "not quantized" and give None; a plain or
    `+:` pattern, a regex matched at the start of the name, gives its settings)."""
    for pattern, settings in (dynamic or {}).items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        literal = re.escape(raw) == raw
        if (layer == raw) if literal else re.match(raw, layer):
            return None if negative else dict(settings)
    return None


def _check_layer(layer: str, shapes: dict[str, list[int]], bits: int, group: int) -> None:
    missing = [p for p in ("qzeros", "scales") if f"{layer}.{p}" not in shapes]
    if missing:
        raise GptqCheckpointError(f"{layer}: missing {', '.join(missing)}")
    packed_in, out = shapes[f"{layer}.qweight"]
    in_features = packed_in * 32 // bits
    groups = 1 if group == -1 else -(-in_features // group)
    scales = shapes[f"{layer}.scales"]
    if scales != [groups, out]:
        raise GptqCheckpointError(
            f"{layer}: scales {scales} do not match {bits}-bit group size {group} over "
            f"{in_features}x{out} weights (expected {[groups, out]})"
        )
    qzeros = shapes[f"{layer}.qzeros"]
    if qzeros != [groups, out * bits // 32]:
        raise GptqCheckpointError(f"{layer}: qzeros {qzeros} do not match scales {scales}")


def gptq_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Activations dtype for GPTQ kernels: half precision (the int4 kernels take no fp32)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"GPTQ models run in bfloat16 or float16 activations, not {dtype}")
    return getattr(torch, dtype)


def kernel_order(
    device: torch.device, backend: str = "auto", bits: set[int] | None = None
) -> tuple[str, ...]:
    """The GPTQ kernels to try, fastest first: `auto` picks by device and the checkpoint's
    `bits` (CPU: the int4 kernels take 4-bit layers only: any other width, in any layer, leaves
    gptqmodel's eager `gptq_torch` for the whole model), else just `backend`."""
    if backend != "auto":
        return (backend,)
    if device.type != "cpu":
        return CUDA_BACKENDS
    return CPU_BACKENDS if bits is None or bits == {4} else CPU_BACKENDS[-1:]


def layer_bits(qc: dict[str, Any]) -> set[int]:
    """Every bit width a quantize config gives its layers (its own and `dynamic` overrides)."""
    overrides = (qc.get("dynamic") or {}).values()
    return {int(qc["bits"])} | {int(o["bits"]) for o in overrides if o and "bits" in o}


def load_gptq(
    path: str, device: torch.device, dtype: torch.dtype, backend: str = "auto"
) -> tuple[torch.nn.Module, str]:
    """Load a checked GPTQ checkpoint; `auto` tries the fastest kernels for the device first."""
    qc = check_checkpoint(Path(path))
    fmt = checkpoint_format(qc)
    if device.type == "cpu" and fmt not in CPU_FORMATS:
        raise GptqCheckpointError(
            f"{path}: checkpoint format {fmt!r} has no CPU kernel (CPU kernels read "
            f"{' and '.join(CPU_FORMATS)}; {fmt} layouts are for CUDA kernels)"
        )
    gptqmodel = import_gptqmodel()

    errors = []
    for name in kernel_order(device, backend, layer_bits(qc)):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # its load report, too
                model = gptqmodel.GPTQModel.load(
                    path, device=str(device), backend=gptqmodel.BACKEND(name), dtype=dtype
                ).model
            with torch.inference_mode():  # some kernels load, then refuse at the first matmul
                model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
        except Exception as exc:  # a kernel that cannot run here: try the next one
            errors.append(f"{name}: {exc}")
            continue
        model.generation_config.do_sample = False  # gptqmodel forces it on at load
        return model, name
    raise RuntimeError(f"no GPTQ kernel could load {path}: " + "; ".join(errors))
