"""Which extra (`pip install 'inferq[...]'`) holds a module a verb needs, and the hint the
CLI prints when it is missing."""

from __future__ import annotations

# what a verb may need beyond `pip install inferq` (the producer's install), by top-level module
EXTRAS = {
    "sqlalchemy": "sql",
    "alembic": "sql",
    "psycopg": "sql",
    "rich": "report",
    "matplotlib": "report",
    "fastapi": "gateway",
    "uvicorn": "gateway",
    "torch": "worker",
    "transformers": "worker",
    "prometheus_client": "worker",
    "gptqmodel": "quantize",  # quantizing, and loading GPTQ models
}


def missing_extra_hint(verb: str, module: str) -> str | None:
    """What `inferq VERB` says when `module` is not installed, or None if no extra has it."""
    extra = EXTRAS.get(module.partition(".")[0])
    if extra is None:
        return None
    hint = f"inferq {verb}: needs {module}: pip install 'inferq[{extra}]'"
    if extra == "quantize" and verb != "model":  # serving GPTQ models needs gptqmodel alone
        hint += f", or to serve only: pip install --no-deps '{_pinned('gptqmodel')}'"
    return hint


def _pinned(name: str) -> str:
    """`name` as this inferq's metadata pins it (the bare name without metadata)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("inferq") or []
    except PackageNotFoundError:
        return name
    pins = [r.partition(";")[0].strip() for r in reqs if r.startswith(f"{name}==")]
    return pins[0] if pins else name
