"""`inferq model add NAME PATH`: a local Hugging Face directory (dense or GPTQ) registered
under a name, so that a worker serves it by that name (`INFERQ_MODEL=NAME`, or NAME in
`INFERQ_MODELS`). Checked once here, with a clear reason for each refusal: the family is one
the engine is tested on, a GPTQ checkpoint matches its quantize config and has a kernel on
the device, the tokenizer and its chat template are there, and the weights, one step and the
smallest KV cache fit the memory free now.

The registrations are one JSON file, `INFERQ_HOME/models.json` (read through
`Settings.registered_models`), written whole and atomically.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inferq.settings import Settings
from worker.prep.models import KNOWN_MODELS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelCheckError(ValueError):
    """A directory that cannot be served as it is, with the reason."""


def add_model(settings: Settings, name: str, path: str | Path, *, replace: bool = False) -> dict:
    """Check the directory at `path` and register it under `name`; the registration."""
    if not NAME.match(name):
        raise ModelCheckError(
            f"model name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', not starting "
            "with a punctuation mark"
        )
    if name in KNOWN_MODELS:
        raise ModelCheckError(f"{name!r} is a built-in model (`inferq model prepare` makes it)")
    if name in settings.registered_models() and not replace:
        raise ModelCheckError(f"{name!r} is already added (--replace to point it elsewhere)")
    entry = check_model_dir(settings, Path(path).expanduser().resolve())
    entry["added_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write(settings, {**settings.registered_models(), name: entry})
    return entry


def remove_model(settings: Settings, name: str) -> bool:
    """Forget an added model (its directory stays); False when it was not added."""
    models = settings.registered_models()
    if models.pop(name, None) is None:
        return False
    _write(settings, models)
    return True


def check_model_dir(settings: Settings, path: Path) -> dict[str, Any]:
    """Every check `add_model` makes; what was found, for the registration."""
    from transformers import AutoConfig

    from worker.engine.families import check_supported

    if not (path / "config.json").is_file():
        raise ModelCheckError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelCheckError(f"{path}/config.json cannot be read: {exc}") from exc
    check_supported(config)  # UnsupportedModelError names the model type and architecture
    quantization = _check_weights(settings, path, config)
    _check_tokenizer(path)
    return {
        "path": str(path),
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "quantization": quantization,
        **_check_memory(settings, path),
    }


def _check_weights(settings: Settings, path: Path, config: Any) -> str:
    """'none' for a dense checkpoint, else a GPTQ summary; refuses other quantizations, a
    GPTQ checkpoint that does not match its config or has no kernel on the device, and a
    directory without weights."""
    from worker.engine.loading import (
        CPU_FORMATS,
        check_checkpoint,
        checkpoint_format,
        pick_device,
        quantize_config,
    )

    method = (getattr(config, "quantization_config", None) or {}).get("quant_method")
    qc = quantize_config(path)
    if qc is None:
        if method:
            raise ModelCheckError(
                f"{path}: quantization {method!r} is not served here (dense or GPTQ only)"
            )
        if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
            raise ModelCheckError(f"{path} holds no weights (*.safetensors or *.bin)")
        return "none"
    check_checkpoint(path)  # GptqCheckpointError says which tensor does not match
    fmt = checkpoint_format(qc)
    if pick_device(settings.device).type == "cpu" and fmt not in CPU_FORMATS:
        raise ModelCheckError(
            f"{path}: GPTQ checkpoint format {fmt!r} has no CPU kernel "
            f"(CPU kernels read {' and '.join(CPU_FORMATS)})"
        )
    return f"gptq {qc['bits']}-bit, group {qc.get('group_size', -1)}, {fmt}"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer of the family's class instead
        raise ModelCheckError(
            f"{path} has no usable tokenizer: none of {', '.join(TOKENIZER_FILES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError, ...
        raise ModelCheckError(
            f"{path} has no usable tokenizer (tokenizer.json or tokenizer_config.json): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelCheckError(
            f"{path}: the tokenizer has no chat template, so chat jobs (messages) could not be "
            "rendered: add one (chat_template.jinja, or chat_template in tokenizer_config.json)"
        )


def _check_memory(settings: Settings, path: Path) -> dict[str, Any]:
    """Weights, one step and the smallest KV cache within the memory free now; the KV cache
    the model would get alone (InsufficientMemoryError when it does not fit)."""
    from worker.engine.loading import pick_device
    from worker.engine.memory import (
        GIB,
        InsufficientMemoryError,
        ModelShape,
        free_memory,
        load_dtype,
        plan_kv,
        weights_bytes,
    )

    dtype, quantized = load_dtype(path, settings.device, settings.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    weights = weights_bytes(path, dtype.itemsize, quantized)
    free = free_memory(pick_device(settings.device).type)
    shape = ModelShape.read(path)
    if weights >= free:
        raise InsufficientMemoryError(
            f"{path}: its weights take {weights / GIB:.2f} GiB in {dtype_name}, "
            f"{free / GIB:.2f} GiB is free"
        )
    try:
        plan = plan_kv(shape, dtype.itemsize, settings.engine_config(), free - weights)
    except InsufficientMemoryError as exc:
        raise InsufficientMemoryError(
            f"{path}: weights {weights / GIB:.2f} GiB, then {exc}"
        ) from exc
    return {
        "dtype": dtype_name,
        "weights_gib": round(weights / GIB, 3),
        "kv_bytes_per_token": shape.kv_bytes_per_token(dtype.itemsize),
        "max_context": shape.max_context,
        "kv_tokens_alone": plan.tokens,
    }


def _write(settings: Settings, models: dict[str, dict]) -> None:
    target = settings.model_registry
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".models-", suffix=".json", dir=target.parent)
    with os.fdopen(fd, "w") as out:
        json.dump({"models": dict(sorted(models.items()))}, out, indent=2)
        out.write("\n")
    os.replace(tmp, target)
