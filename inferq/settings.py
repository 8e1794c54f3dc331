"""Runtime settings, read from `INFERQ_*` environment variables (or a `.env`-style file).

With nothing set, everything is embedded: a SQLite database and a SQLite-file broker
under `INFERQ_HOME`, so a single machine runs the whole path with no servers.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

FP_MODEL = "smollm2-135m-instruct"  # dequantized from the GGUF, fp32 safetensors
DEFAULT_MODEL = "smollm2-135m-instruct-gptq"  # its GPTQ 4-bit variant, quantized here
DEFAULT_QUEUE = "inferq"


def _default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferq"


class Settings(BaseSettings):
    """Everything a worker, a client or the CLI needs to know, with embedded defaults."""

    model_config = SettingsConfigDict(
        env_prefix="INFERQ_",
        env_file=os.environ.get("INFERQ_SETTINGS_FILE"),
        extra="ignore",
    )

    home: Path = Field(default_factory=_default_home, description="cache and embedded-state dir")
    broker_url: str | None = Field(None, description="Celery broker; default: SQLite file broker")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file")
    queue: str = DEFAULT_QUEUE
    model: str = Field(DEFAULT_MODEL, description="model name served by the worker")
    model_path: str | None = Field(
        None, description="HF model directory or hub id to serve instead of the default model"
    )
    models: str = Field(
        "", description="more models to serve, comma-separated: known names or name=path"
    )
    gptq_backend: str = Field(
        "auto", description="GPTQ kernel: auto, or a gptqmodel backend (gptq_torch_aten, ...)"
    )
    device: str = Field("auto", description="auto | cpu | cuda")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    max_prompt_tokens: int = Field(2048, ge=1)
    max_new_tokens: int = Field(512, ge=1, description="upper bound on a job's max_tokens")
    aging_s: float = Field(5.0, gt=0, description="waiting this long raises a job one class")
    max_attempts: int = Field(3, ge=1, description="deliveries before a job is failed")
    heartbeat_s: float = Field(5.0, gt=0, description="worker heartbeat and sweep interval")
    worker_dead_after_s: float = Field(
        60.0, gt=0, description="a worker silent this long is dead: its running jobs go back"
    )
    requeue_after_s: float = Field(
        600.0, gt=0, description="a job queued this long is sent again (lost messages)"
    )
    drain_s: float = Field(
        30.0, ge=0, description="on SIGTERM: how long running jobs may finish before requeue"
    )
    visibility_timeout_s: int = Field(
        1800, ge=1, description="redelivery after a worker dies; must exceed wait + run"
    )
    engine: str = Field(
        "paged", pattern="^(paged|null)$", description="paged, or null (instant; benchmarks)"
    )
    kv_cache_tokens: int = Field(32768, ge=256, description="paged KV capacity in tokens")
    max_num_seqs: int = Field(64, ge=1, description="sequences decoding at once (paged)")
    waiting_room: float = Field(
        3.0, ge=0, description="jobs a worker holds beyond max_num_seqs, as a multiple of it"
    )
    max_step_tokens: int = Field(2048, ge=16, description="tokens computed per step (paged)")
    prefix_cache: bool = True
    cache_secret: str = Field(
        default_factory=lambda: secrets.token_hex(16),
        description="keys per-tenant prefix-cache salts; random per process when unset",
    )
    worker_name: str | None = None
    affinity: bool = Field(
        True,
        description="Redis broker, several workers: route jobs to the worker whose "
        "prefix cache holds their leading blocks",
    )
    affinity_blocks: int = Field(8, ge=1, description="leading KV blocks a routing key covers")
    affinity_load_factor: float = Field(
        1.2, ge=1.0, description="a worker this much busier than the idlest one sheds new jobs"
    )
    affinity_dead_after_s: float = Field(
        10.0, gt=0, description="a worker silent this long: its affinity queue is drained"
    )
    tenant: str = Field("default", description="the tenant a client submits and reads as")
    tenant_key: str | None = Field(None, description="the client's tenant signing key")
    tenant_keys: str = Field(
        "", description="worker: tenant=key,... whose messages must be signed with that key"
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics, /healthz, /readyz here (0: any port)"
    )

    @cached_property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'inferq.db'}"

    def served_models(self) -> dict[str, str | None]:
        """Model name -> explicit path (None: a known model, prepared on demand)."""
        served: dict[str, str | None] = {self.model: self.model_path}
        for entry in filter(None, (e.strip() for e in self.models.split(","))):
            name, _, path = entry.partition("=")
            served.setdefault(name.strip(), path.strip() or None)
        return served

    def signing_keys(self) -> dict[str, str]:
        """Tenant -> signing key, from `tenant_keys`."""
        pairs = (e.partition("=") for e in self.tenant_keys.split(",") if e.strip())
        return {t.strip(): k.strip() for t, _, k in pairs}

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def embedded(self) -> bool:
        return self.broker_url is None


def get_settings(**overrides: object) -> Settings:
    """Fresh settings from the environment, with explicit overrides on top."""
    settings = Settings(**overrides)  # type: ignore[arg-type]
    settings.home.mkdir(parents=True, exist_ok=True)
    return settings
