"""The serving install (the image: [worker,gateway], gptqmodel without its own requirements)
holds none of [tool.inferq] quantize-only, and needs none: in a Python that sees this venv's
site-packages less those distributions, a worker quantizes a model with our recipe, loads the
GPTQ checkpoint and generates, and none of them is imported or importable."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from tiny_models import gptq_source

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import importlib.util, json, site, sys
site.addsitedir(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine
from worker.prep.quantize import GptqSpec, quantize
hidden = json.loads(sys.argv[5])
findable = [m for m in hidden if importlib.util.find_spec(m) is not None]
dst = Path(sys.argv[4])
quantize(Path(sys.argv[3]), dst, GptqSpec(group_size=32, samples=16, batch_size=8), device="cpu")
engine = PagedEngine(str(dst), "lean", device="cpu", dtype="auto")
params = SamplingParams(max_tokens=6)
request = EngineRequest(seq_id="a", prompt_ids=[1, 2, 3, 4], params=params, ignore_eos=True)
out = run_to_completion(engine, [request])
imported = sorted({m.partition(".")[0] for m in sys.modules} & set(hidden))
print("RESULT " + json.dumps({"tokens": out[0].token_ids, "imported": imported,
                              "findable": findable, "gptqmodel": "gptqmodel" in sys.modules}))
"""


def quantize_only() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["inferq"]["quantize-only"]


def _in_site(module: str) -> bool:
    """`module` imports from site-packages here (not the standard library's of that name,
    as multiprocess's top-level `test` folder would be)."""
    spec = importlib.util.find_spec(module)
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    return (
        spec is not None and spec.origin is not None and site in Path(spec.origin).resolve().parents
    )


def site_without(names: list[str], view: Path) -> list[str]:
    """Link every entry of this venv's site-packages into `view` but those of the `names`
    distributions (their packages, modules and metadata); returns their top-level modules."""
    hidden: set[str] = set()
    modules: set[str] = set()
    for name in names:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__"):
                continue
            hidden.add(top)
            module = top.removesuffix(".py").partition(".")[0]
            if not top.endswith((".dist-info", ".data")) and _in_site(module):
                modules.add(module)
    view.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name not in hidden:
            (view / entry.name).symlink_to(entry)
    return sorted(modules)


@pytest.mark.model
def test_quantize_and_serve_without_quantize_only_packages(tmp_path: Path, model_path: str) -> None:
    names = quantize_only()
    modules = site_without(names, tmp_path / "site")
    assert {"datasets", "pyarrow", "pandas", "torchao"} <= set(modules)  # installed here
    src = gptq_source(tmp_path / "src", model_path)
    args = [str(tmp_path / "site"), str(ROOT), str(src), str(tmp_path / "q"), json.dumps(modules)]
    run = subprocess.run(
        [sys.executable, "-S", "-c", CHILD, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["findable"] == [], "the view still shows them"
    assert result["imported"] == []
    assert result["gptqmodel"] and len(result["tokens"]) == 6
    assert (tmp_path / "q" / "quantize_config.json").is_file()
