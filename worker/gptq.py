"""GPTQ 4-bit checkpoints: quantize a Hugging Face directory with gptqmodel, check a
checkpoint's tensors before trusting it, and load it with the fastest kernel that runs here.

gptqmodel is imported lazily: it prints a banner and takes seconds to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_FILE = DATA_DIR / "calibration.jsonl"
# The fast CPU int4 kernel takes groups of 32/64/128/256; the smallest keeps the most quality.
DEFAULT_GROUP_SIZE = 32
CPU_BACKENDS = ("gptq_torch_aten", "gptq_torch_fused", "gptq_torch")
CUDA_BACKENDS = ("gptq_marlin", "gptq_exllama_v2", "gptq_triton", "gptq_torch")


class GptqCheckpointError(ValueError):
    """A GPTQ checkpoint that is broken, or does not match its own quantize config."""


@dataclass(frozen=True)
class GptqSpec:
    """How to quantize: 4-bit symmetric by default, group size picked from the model.

    act_order quantizes columns in order of decreasing activation size (GPTQ desc_act);
    mse > 0 searches each group's clipping range under that norm instead of min/max. Both cut
    SmolLM2's held-out perplexity loss roughly in half, and run on the same fast kernels."""

    bits: int = 4
    group_size: int | None = None
    act_order: bool = True
    mse: float = 2.4
    samples: int = 320
    batch_size: int = 16
    seed: int = 0


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


def pick_group_size(hidden_size: int, intermediate_size: int) -> int:
    """The default group size, which must divide every linear's input width."""
    if hidden_size % DEFAULT_GROUP_SIZE == 0 and intermediate_size % DEFAULT_GROUP_SIZE == 0:
        return DEFAULT_GROUP_SIZE
    raise GptqCheckpointError(
        f"group size {DEFAULT_GROUP_SIZE} does not divide hidden size {hidden_size} and "
        f"intermediate size {intermediate_size}: pass --group-size explicitly"
    )


def calibration_texts(count: int, seed: int) -> list[str]:
    """`count` samples of the shipped calibration text, in a seeded order."""
    lines = CALIBRATION_FILE.read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    if not 0 < count <= len(texts):
        raise ValueError(f"asked for {count} calibration texts; 1 to {len(texts)} ship")
    random.Random(seed).shuffle(texts)
    return texts[:count]


def _gptqmodel():
    """gptqmodel, imported with its banner and log lines sent to stderr (stdout carries the
    worker's JSON logs), and its CPU pool sized so it starts on small machines."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    with contextlib.redirect_stdout(sys.stderr):
        import gptqmodel
    return gptqmodel


def quantize(
    src: Path,
    dst: Path,
    spec: GptqSpec,
    *,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> GptqSpec:
    """Quantize the model at `src` into `dst` (written atomically); returns the spec used."""
    gptqmodel = _gptqmodel()
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    group = spec.group_size or pick_group_size(config.hidden_size, config.intermediate_size)
    spec = GptqSpec(**{**asdict(spec), "group_size": group})
    texts = calibration_texts(spec.samples, spec.seed)
    from worker.model_loading import pick_device  # it imports this module

    target = str(pick_device(device))
    say(f"quantizing {src} to {spec.bits}-bit GPTQ, group size {group}, {len(texts)} texts")
    torch.manual_seed(spec.seed)
    qconfig = gptqmodel.QuantizeConfig(
        bits=spec.bits,
        group_size=group,
        sym=True,
        desc_act=spec.act_order,
        act_group_aware=not spec.act_order,  # gptqmodel's alternative ordering; one or other
        mse=spec.mse,
        offload_to_disk=False,
    )
    started = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        _keep_logs_in(tmp / "logs")
        model = gptqmodel.GPTQModel.load(str(src), qconfig, device=target)
        tokenizer = AutoTokenizer.from_pretrained(src)
        model.quantize(texts, batch_size=spec.batch_size, tokenizer=tokenizer)
        model.save(str(tmp))
        _settle_generation_config(src, tmp)
        (tmp / "inferq-gptq.json").write_text(json.dumps({"source": str(src), **asdict(spec)}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    say(f"quantized in {time.perf_counter() - started:.0f}s")
    return spec


def _keep_logs_in(folder: Path) -> None:
    """gptqmodel writes per-layer quantization logs to ./logs; keep them with the output."""
    try:
        from gptqmodel.looper import loop_processor

        loop_processor._PROJECT_LOG_DIR = folder
    except (ImportError, AttributeError):
        pass


def _settle_generation_config(src: Path, dst: Path) -> None:
    """gptqmodel saves `do_sample: true`; keep the source's generation defaults instead."""
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst / "generation_config.json")
        return
    config_file = dst / "generation_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config.pop("do_sample", None)
        config_file.write_text(json.dumps(config, indent=2))


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
    for layer in layers:
        _check_layer(layer, shapes, bits, group)
    return qc


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


def load_gptq(
    path: str, device: torch.device, dtype: torch.dtype, backend: str = "auto"
) -> tuple[torch.nn.Module, str]:
    """Load a checked GPTQ checkpoint; `auto` tries the fastest kernels for the device first."""
    check_checkpoint(Path(path))
    gptqmodel = _gptqmodel()

    order = (
        (CPU_BACKENDS if device.type == "cpu" else CUDA_BACKENDS)
        if backend == "auto"
        else (backend,)
    )
    errors = []
    for name in order:
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
