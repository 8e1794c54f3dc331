"""The layering, checked from the source: which package may import what.

- kv/, scheduler/: pure Python over ids and token counts (no torch, no I/O, nothing of ours
  but each other).
- worker/engine/: every tensor; no queue, database or service code. It may import one module
  of ours outside it, `inferq.params`: the leaf (pydantic and the standard library, no I/O)
  that holds `SamplingParams`, the class the wire validates a job's params into and the
  sampler reads (so nothing copies them between two classes), and `EngineConfig`, whose
  defaults `Settings` reads (so each default is written once). It lives on the producer's
  side of the line because a producer must import it without worker code or torch.
- worker/broker/: message sources, the Redis fast path, routing (no torch, no engine, no
  storage); the rest of the worker uses it only through the package `worker.broker`.
- worker/service/: the service; talks to engines only through worker.engine.api (no torch).
- No import cycles inside worker/ (function-level imports count).
- storage/, api_client/, gateway/: no worker code and no torch (a producer installs without torch).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_AND_SERVICES = {
    "celery",
    "kombu",
    "redis",
    "sqlalchemy",
    "psycopg",
    "storage",
    "api_client",
    "inferq",
    "worker.service",
    "worker.prep",
    "requests",
    "socket",
}
NOT_IN_BROKER = {
    "torch",
    "transformers",
    "worker.engine",
    "worker.service",
    "worker.prep",
    "storage",
    "sqlalchemy",
    "psycopg",
    "scheduler",
}
FORBIDDEN = {
    "kv": {"torch", "worker", "scheduler", *IO_AND_SERVICES},
    "scheduler": {"torch", "worker", *IO_AND_SERVICES},
    "worker/engine": IO_AND_SERVICES,
    "worker/broker": NOT_IN_BROKER,
    "worker/service": {"torch", "transformers", "worker.engine.runner", "worker.engine.attention"},
    "storage": {"torch", "worker", "api_client", "gateway"},
    "api_client": {"torch", "transformers", "worker", "gateway"},
    "gateway": {"torch", "transformers", "worker"},
}
ALLOWED = {"worker/engine": {"inferq.params"}}  # exceptions to FORBIDDEN, see the docstring
LEAF = "inferq/params.py"
LEAF_IMPORTS = {"__future__", "dataclasses", "typing", "pydantic"}


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
    allowed = ALLOWED.get(package, set())
    broken = {
        str(f.relative_to(ROOT)): sorted(
            n for n in _imports(f) if _hits(n, FORBIDDEN[package]) and n not in allowed
        )
        for f in files
    }
    assert {f: names for f, names in broken.items() if names} == {}


def test_the_shared_params_module_is_a_leaf() -> None:
    """What the engine may import of `inferq` imports nothing of ours and no I/O."""
    assert _imports(ROOT / LEAF) <= LEAF_IMPORTS


def _loaded_after(imports: str, banned: set[str]) -> subprocess.CompletedProcess[str]:
    """Import `imports` in a fresh interpreter; fail when a module in `banned` got loaded."""
    probe = (
        f"import sys, {imports}; bad = sorted(m for m in sys.modules if any(m == b or "
        f"m.startswith(b + '.') for b in {sorted(banned)!r})); print(bad); sys.exit(bool(bad))"
    )
    return subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_engine_api_loads_no_io_or_service_code() -> None:
    """Transitively too: `inferq.params` must not drag in settings, the client or storage."""
    banned = {
        "celery",
        "kombu",
        "redis",
        "sqlalchemy",
        "psycopg",
        "storage",
        "api_client",
        "inferq.settings",
        "inferq.logs",
        "worker.service",
    }
    done = _loaded_after("worker.engine.api, worker.engine.null", banned)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_client_imports_without_torch_or_worker_code() -> None:
    banned = {"torch", "transformers", "gptqmodel", "worker"}
    done = _loaded_after("api_client, api_client.wire, storage.repository", banned)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_gateway_imports_without_torch_or_worker_code() -> None:
    """`inferq[gateway]` is a producer: FastAPI and the client, no model code."""
    banned = {"torch", "transformers", "gptqmodel", "worker"}
    done = _loaded_after("gateway, gateway.app", banned)
    assert done.returncode == 0, done.stdout + done.stderr


# -- no import cycles inside worker/ ------------------------------------------------------


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (at any depth of the file: function-level
    and `TYPE_CHECKING` imports count). `from p import m` names module `p.m` when there is
    one, else `p`; importing `p.m` runs `p/__init__.py` first, which is not counted as an edge
    (a package that re-exports its modules is not a cycle; a module that imports its own
    package's `__init__` is)."""
    files = sorted((root / package).rglob("*.py"))
    modules = {_module_name(f, root): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_inside_worker() -> None:
    graph = import_graph(ROOT, "worker")
    assert "worker.broker.redis_source" in graph["worker.broker.factory"]  # the graph is real
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_function_level_cycle(tmp_path: Path) -> None:
    """The check itself: two modules that import each other, one inside a function (as
    sources.py and redis_source.py once did), are one cycle; a package re-exporting its
    modules is none."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import open_a\nfrom pkg.c import C\n")
    (pkg / "a.py").write_text("def open_a():\n    from pkg.b import B\n    return B()\n")
    (pkg / "b.py").write_text("from pkg import a\n\nclass B: ...\n")
    (pkg / "c.py").write_text("from .b import B\n\nclass C(B): ...\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


# -- the broker's surface -------------------------------------------------------------------


def _named(path: Path) -> set[str]:
    """Every dotted name a file imports: modules, and `module.name` for `from module import
    name`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_worker_uses_the_broker_only_through_its_package() -> None:
    """worker.broker's modules are its own: the rest of the worker imports `worker.broker`."""
    broker = ROOT / "worker" / "broker"
    inside = {f"worker.broker.{f.stem}" for f in broker.glob("*.py")} - {"worker.broker.__init__"}
    broken = {
        str(path.relative_to(ROOT)): sorted(
            n for n in _named(path) if any(n == m or n.startswith(m + ".") for m in inside)
        )
        for path in sorted((ROOT / "worker").rglob("*.py"))
        if broker not in path.parents
    }
    assert inside and {f: names for f, names in broken.items() if names} == {}


def test_jobs_are_enqueued_only_through_send_job() -> None:
    """One way onto the queue, signed when a key is given: `api_client.wire.send_job` (the
    client's and the sweeper's); nothing else of ours calls `send_task`."""
    callers = sorted(
        str(path.relative_to(ROOT))
        for package in ("api_client", "gateway", "inferq", "storage", "worker")
        for path in (ROOT / package).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "send_task"
    )
    assert callers == ["api_client/wire.py"]
