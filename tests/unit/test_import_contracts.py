"""The layering, checked from the source: which package may import what.

- kv/, scheduler/: pure Python over ids and token counts (no torch, no I/O, nothing of ours
  but each other).
- worker/engine/: every tensor; no queue, database or service code.
- worker/service/: the service; talks to engines only through worker.engine.api (no torch).
- storage/, api_client/: no worker code and no torch (a producer installs without torch).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_AND_SERVICES = {"celery", "kombu", "redis", "sqlalchemy", "psycopg", "storage", "api_client",
                   "inferq", "worker.service", "worker.prep", "requests", "socket"}  # fmt: skip
FORBIDDEN = {
    "kv": {"torch", "worker", "scheduler", *IO_AND_SERVICES},
    "scheduler": {"torch", "worker", *IO_AND_SERVICES},
    "worker/engine": IO_AND_SERVICES,
    "worker/service": {"torch", "transformers", "worker.engine.runner", "worker.engine.attention"},
    "storage": {"torch", "worker", "api_client"},
    "api_client": {"torch", "transformers", "worker"},
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _hits(name: str, banned: set[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}"
    broken = {
        str(f.relative_to(ROOT)): sorted(n for n in _imports(f) if _hits(n, FORBIDDEN[package]))
        for f in files
    }
    assert {f: names for f, names in broken.items() if names} == {}


def test_the_client_imports_without_torch_or_worker_code() -> None:
    probe = (
        "import sys, api_client, api_client.wire, storage.repository; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'transformers', 'gptqmodel', 'worker'}); print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
