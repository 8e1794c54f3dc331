"""GPTQ 4-bit quantization of a Hugging Face directory with gptqmodel (checking and loading
checkpoints is the engine's: `worker.engine.loading`)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from worker.engine.loading import GptqCheckpointError, import_gptqmodel, pick_device
from worker.prep.clipping import fast_clipping_search
from worker.prep.portable import settle_act_order
from worker.prep.progress import active_view
from worker.prep.recipe import GptqSpec

DATA_DIR = Path(__file__).parents[1] / "data"
CALIBRATION_FILE = DATA_DIR / "calibration.jsonl"
# The fast CPU int4 kernel takes groups of 32/64/128/256; the smallest keeps the most quality.
DEFAULT_GROUP_SIZE = 32


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


def calibration_input(texts: list[str], tokenizer, max_tokens: int) -> list[str] | list[list[int]]:
    """The texts as gptqmodel takes them: whole, or as token ids cut to `max_tokens`."""
    if not max_tokens:
        return texts
    return [tokenizer(text)["input_ids"][:max_tokens] for text in texts]


def quantize(
    src: Path,
    dst: Path,
    spec: GptqSpec,
    *,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> GptqSpec:
    """Quantize the model at `src` into `dst` (written atomically); returns the spec used."""
    with active_view().stage("quantize", f"GPTQ {spec.bits}-bit", unit="layers") as stage:
        stage.update(note="importing gptqmodel")
        return _quantize(src, dst, spec, device=device, say=say, stage=stage)


def _quantize(src, dst, spec, *, device, say, stage) -> GptqSpec:
    gptqmodel = import_gptqmodel()
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    group = spec.group_size or pick_group_size(config.hidden_size, config.intermediate_size)
    spec = GptqSpec(**{**asdict(spec), "group_size": group})
    texts = calibration_texts(spec.samples, spec.seed)
    target = str(pick_device(device))
    say(f"quantizing {src} to {spec.bits}-bit GPTQ, group size {group}, {len(texts)} texts")
    layers = getattr(config, "num_hidden_layers", None)
    stage.update(total=layers, note="loading the model")
    torch.manual_seed(spec.seed)
    qconfig = gptqmodel.QuantizeConfig(
        bits=spec.bits,
        group_size=group,
        sym=spec.sym,
        desc_act=spec.act_order,
        static_groups=spec.static_groups,
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
        # gptqmodel's looper calls `layer_callback` as each layer is quantized (and again when
        # its modules are finalized): count the distinct layers.
        model.layer_callback = LayerCounter(stage, layers)
        stage.update(note="calibrating")
        with fast_clipping_search(spec.clip_steps):
            model.quantize(
                calibration_input(texts, tokenizer, spec.max_tokens),
                batch_size=spec.batch_size,
                tokenizer=tokenizer,
            )
        stage.update(note="saving")
        model.save(str(tmp))
        _settle_generation_config(src, tmp)
        if settle_act_order(tmp):
            say("act-order kept every group in place: the config says desc_act: false")
        (tmp / "inferq-gptq.json").write_text(json.dumps({"source": str(src), **asdict(spec)}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    say(f"quantized in {time.perf_counter() - started:.0f}s")
    return spec


class LayerCounter:
    """gptqmodel's layer-complete callback: moves the stage to the number of distinct decoder
    layers seen (layer indices past the last layer, e.g. lm_head, are not counted)."""

    def __init__(self, stage, layers: int | None):
        self.stage = stage
        self.layers = layers
        self.seen: set[int] = set()
        self._lock = threading.Lock()

    def layer_complete(self, *, layer_idx, submodule_finalized: bool) -> None:
        if not isinstance(layer_idx, int) or layer_idx < 0:
            return
        if self.layers is not None and layer_idx >= self.layers:
            return
        with self._lock:
            self.seen.add(layer_idx)
            done = len(self.seen)
        self.stage.update(done=done, note="quantizing")


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
