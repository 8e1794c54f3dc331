"""`inferq model quantize` beyond Llama: a tiny random-weight model of another family
(tests/engine/tiny_models.py's config, 2 layers, the SmolLM2 tokenizer so that calibration
reads real text) quantized by `worker.prep.quantize.quantize` (what the verb runs: gptqmodel
with this project's recipe), then served by the engine and checked against gptqmodel's own
generate on the same checkpoint (test_gptq's rule: equal up to a bf16 near-tie)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_gptq_variants import _check_against_gptqmodel

from tests.engine.tiny_models import ALTERNATING, config
from tests.engine.tiny_models import FAMILIES as TINY
from worker.engine.engine import PagedEngine
from worker.engine.gptq_dispatch import DispatchLinear
from worker.prep.quantize import GptqSpec, quantize

pytestmark = pytest.mark.model
#: family -> whether the lean forward runs it (the others: transformers' modules)
FAMILIES = {
    "mistral": True,
    "qwen2": True,
    "qwen3": True,
    "gemma": True,
    "gemma2": False,
    "gemma3": True,
    "phi3": False,
    "olmo2": False,
    "granite": False,
    "stablelm": False,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_quantized_here_serves_like_gptqmodel(
    family: str, tmp_path: Path, model_path: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    layers = {"layer_types": ALTERNATING[:2]} if "layer_types" in TINY[family][1] else {}
    cfg = config(
        family,
        **layers,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        initializer_range=0.3,  # wide logits: varied greedy tokens
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    src, dst = tmp_path / "src", tmp_path / "gptq"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    tokenizer.save_pretrained(src)

    quantize(src, dst, GptqSpec(samples=16, batch_size=8), device="cpu")
    engine = PagedEngine(str(dst), family, "cpu", "auto")
    assert engine.runner.kernel.startswith("gptq_")
    assert (engine.runner.lean is not None) == FAMILIES[family]
    assert any(isinstance(m, DispatchLinear) for m in engine.runner.model.modules())
    _check_against_gptqmodel(dst, engine)
