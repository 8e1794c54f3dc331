"""worker/prep/clipping.py: the batched clipping search picks what gptqmodel's loop picks, and a
quantized checkpoint is the same tensor for tensor with it or without it."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import gptq_source

from worker.engine.loading import import_gptqmodel
from worker.prep import clipping
from worker.prep import quantize as quantize_module
from worker.prep.quantize import GptqSpec, quantize


def _quantizer(sym: bool, mse: float, bits: int = 4, group_size: int = 32):
    gptqmodel = import_gptqmodel()
    from gptqmodel.quantization.quantizer import Quantizer

    with contextlib.redirect_stdout(sys.stderr):
        qcfg = gptqmodel.QuantizeConfig(
            bits=bits, group_size=group_size, sym=sym, mse=mse, desc_act=True, static_groups=True
        )
    quantizer = Quantizer(qcfg=qcfg)
    quantizer.configure(perchannel=True)
    return quantizer


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen)
    w[1] = 0  # an all-zero row takes the [-1, 1] range
    w[2] = w[2].abs()  # all positive: the range still includes zero
    w[3, 5] = 40.0  # an outlier the search clips
    return w


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("rows", [192, 576, 1536])
def test_group_search_equals_gptqmodel(sym: bool, rows: int) -> None:
    w = _weights(rows, 32, seed=rows)
    theirs, ours = _quantizer(sym, 2.4), _quantizer(sym, 2.4)
    theirs.find_params(w.clone(), weight=True)
    with clipping.fast_clipping_search():
        ours.find_params(w.clone(), weight=True)
    assert torch.equal(theirs.scale, ours.scale)
    assert torch.equal(theirs.zero, ours.zero)
    plain = _quantizer(sym, 0.0)  # the search moved some rows off their min/max range
    plain.find_params(w.clone(), weight=True)
    assert not torch.equal(plain.scale, ours.scale)


def test_small_chunks_choose_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk boundaries keep the first minimum (the loop's strict `<` across chunks)."""
    w = _weights(64, 32, seed=7)
    whole = _quantizer(False, 2.4)
    with clipping.fast_clipping_search():
        whole.find_params(w.clone(), weight=True)
        monkeypatch.setattr(clipping, "CHUNK_ELEMENTS", 3 * w.numel())  # 3 steps per chunk
        chunked = _quantizer(False, 2.4)
        chunked.find_params(w.clone(), weight=True)
    assert torch.equal(whole.scale, chunked.scale) and torch.equal(whole.zero, chunked.zero)


def test_other_cases_run_gptqmodels_own_code() -> None:
    w = _weights(64, 32, seed=3)
    for make in (
        lambda: _quantizer(False, 2.4, bits=2),
        lambda: _quantizer(True, 2.4, group_size=-1),
    ):
        theirs, ours = make(), make()
        theirs.find_params(w.clone(), weight=True)
        with clipping.fast_clipping_search():
            ours.find_params(w.clone(), weight=True)
        assert torch.equal(theirs.scale, ours.scale) and torch.equal(theirs.zero, ours.zero)


def test_swap_is_undone_and_nests() -> None:
    import_gptqmodel()
    from gptqmodel.quantization.quantizer import Quantizer

    before = Quantizer.find_params
    with clipping.fast_clipping_search(), clipping.fast_clipping_search():
        assert Quantizer.find_params is clipping.find_params
    assert Quantizer.find_params is before


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.model
def test_checkpoint_same_with_gptqmodels_search(
    tmp_path: Path, model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny random Llama quantized with the default recipe's settings: every saved tensor
    (qweight, qzeros, scales, g_idx, the rest) is equal with either search."""
    src = gptq_source(tmp_path / "src", model_path)
    spec = GptqSpec(group_size=32, samples=16, batch_size=8, clip_steps=clipping.ALL_STEPS)
    quantize(src, tmp_path / "ours", spec, device="cpu", say=lambda _m: None)
    monkeypatch.setattr(quantize_module, "fast_clipping_search", contextlib.nullcontext)
    quantize(src, tmp_path / "theirs", spec, device="cpu", say=lambda _m: None)
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs) and any(k.endswith(".qweight") for k in ours)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization_config"]["sym"] is False
