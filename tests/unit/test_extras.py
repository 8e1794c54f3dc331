"""Installs that fit their role: [worker] serves without the packages only gptqmodel's own
declaration pulls ([quantize]), the image's lock holds none of them (.ci/locks.py), and a verb
run without gptqmodel names the extra."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from inferq.cli import main
from inferq.extras import missing_extra_hint

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(extra: str) -> set[str]:
    reqs = PYPROJECT["project"]["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def _locks():
    spec = importlib.util.spec_from_file_location("ci_locks", ROOT / ".ci" / "locks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_has_gptqmodels_requirements_but_the_quantize_only_ones() -> None:
    quantize_only = {canonicalize_name(n) for n in PYPROJECT["tool"]["inferq"]["quantize-only"]}
    worker = _names("worker")
    declared = set()
    for text in requires("gptqmodel") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            declared.add(canonicalize_name(req.name))
    assert "gptqmodel" not in worker and "gptqmodel" in _names("quantize")
    assert declared - quantize_only <= worker, "a gptqmodel requirement is in neither list"
    assert not quantize_only & worker


def test_image_lock_check_passes_and_catches_a_quantize_only_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locks = _locks()
    assert locks.check() == 0
    assert "quantization-only packages (9): datasets, dill," in capsys.readouterr().out
    serve = tmp_path / "serve.txt"
    pandas = [ln for ln in locks.QUANTIZE.read_text().split("\n") if ln.startswith("pandas==")]
    serve.write_text(locks.SERVE.read_text() + pandas[0] + " --hash=sha256:" + "0" * 64 + "\n")
    assert locks.check(serve_lock=serve) == 1
    assert "FAIL: pandas is quantization-only but in the serving image" in capsys.readouterr().out
    unhashed = tmp_path / "unhashed.txt"
    unhashed.write_text("celery==5.7.0\n")
    with pytest.raises(SystemExit, match="celery has no hash"):
        locks.check(serve_lock=unhashed)


def test_missing_gptqmodel_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    assert missing_extra_hint("model", "gptqmodel") == (
        "inferq model: needs gptqmodel: pip install 'inferq[quantize]'"
    )
    serving = missing_extra_hint("worker", "gptqmodel.models")
    assert serving and "pip install --no-deps 'gptqmodel" in serving
    assert missing_extra_hint("worker", "numpy") is None
    monkeypatch.setenv("INFERQ_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # `import gptqmodel` fails
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    assert main(["model", "quantize", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "needs gptqmodel: pip install 'inferq[quantize]'" in capfd.readouterr().err
