"""Runtime settings, read from `INFERQ_*` environment variables (or a `.env`-style file).

With nothing set, everything is embedded: a SQLite database and a SQLite-file broker
under `INFERQ_HOME`, so a single machine runs the whole path with no servers.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferq.callback_urls import CallbackPolicy
from inferq.params import EngineConfig

FP_MODEL = "smollm2-135m-instruct"  # dequantized from the GGUF, fp32 safetensors
DEFAULT_MODEL = "smollm2-135m-instruct-gptq"  # its GPTQ 4-bit variant, quantized here
DEFAULT_QUEUE = "inferq"
MIN_KEY_CHARS = 16  # of a tenant signing key
WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_BYTES = (24, 64)  # a webhook signing secret's length once decoded (the spec's)
ENGINE = EngineConfig()  # the engine's defaults: written there only


def _default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferq"


def is_redis_url(url: str) -> bool:
    """Whether a broker or result URL names a Redis (`redis://`, `rediss://`)."""
    return url.startswith(("redis://", "rediss://"))


class Settings(BaseSettings):
    """Everything a worker, a client or the CLI needs to know, with embedded defaults."""

    model_config = SettingsConfigDict(
        env_prefix="INFERQ_",
        env_file=os.environ.get("INFERQ_SETTINGS_FILE"),
        extra="ignore",
        hide_input_in_errors=True,  # errors never echo keys
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
        "",
        description="more models to serve, comma-separated: built-in or added names "
        "(inferq model add), or name=path",
    )
    gptq_backend: str = Field(
        ENGINE.gptq_backend,
        description="GPTQ kernel: auto, or a gptqmodel backend (gptq_torch_aten, ...)",
    )
    native: bool = Field(
        ENGINE.native,
        description="CPU: the lean forward and paged attention on C kernels where they build; "
        "false: torch's (GPTQ layers keep their C kernels)",
    )
    keep_heap: bool = Field(
        ENGINE.keep_heap, description="CPU: glibc keeps freed memory for the next engine step"
    )
    gptq_crossover: str = Field(
        ENGINE.gptq_crossover,
        pattern=r"^(auto|off|[0-9]+)$",
        description="CPU GPTQ: rows from which a linear takes its many-row path: auto "
        "(measured at load), N, or off (gptqmodel's modules as they are)",
    )
    gptq_many: str = Field(
        ENGINE.gptq_many,
        pattern="^(auto|fused|dense)$",
        description="CPU GPTQ many-row path: auto (measured), fused or dense",
    )
    device: str = Field("auto", description="auto | cpu | cuda")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    max_prompt_tokens: int = Field(2048, ge=1)
    max_new_tokens: int = Field(512, ge=1, description="upper bound on a job's max_tokens")
    aging_s: float = Field(
        ENGINE.aging_s, gt=0, description="waiting this long raises a job one class"
    )
    max_attempts: int = Field(3, ge=1, description="deliveries before a job is failed")
    heartbeat_s: float = Field(5.0, gt=0, description="worker heartbeat and sweep interval")
    worker_dead_after_s: float = Field(
        60.0, gt=0, description="a worker silent this long is dead: its running jobs go back"
    )
    requeue_after_s: float = Field(
        600.0, gt=0, description="a job queued this long is sent again (lost messages)"
    )
    max_resends: int = Field(
        5, ge=1, description="times the sweeper sends a job again; then the job fails"
    )
    drain_s: float = Field(
        30.0, ge=0, description="on SIGTERM: how long running jobs may finish before requeue"
    )
    visibility_timeout_s: int = Field(
        1800,
        ge=1,
        description="redelivery after a worker dies (Redis: a live worker keeps "
        "what it holds visible; other brokers: must exceed wait + run)",
    )
    broker_aging_s: float = Field(
        5.0,
        gt=0,
        description="Redis: a priority list waiting this long with nothing taken "
        "from it goes first in the next take (a quarter of it, at least one message)",
    )
    engine: str = Field(
        "paged", pattern="^(paged|null)$", description="paged, or null (instant; benchmarks)"
    )
    kv_cache_gib: float = Field(
        ENGINE.kv_cache_gib,
        gt=0,
        description="KV cache memory of a worker in GiB, split between its models (each its "
        "share in proportion to its KV bytes per token); blocks follow from each model's "
        "layers, KV heads, head size and dtype, capped by the memory free after its weights",
    )
    kv_cache_tokens: int | None = Field(
        ENGINE.kv_cache_tokens,
        ge=256,
        description="a fixed KV capacity in tokens per model instead of kv_cache_gib",
    )
    max_num_seqs: int = Field(
        ENGINE.max_num_seqs, ge=1, description="sequences decoding at once (paged)"
    )
    waiting_room: float = Field(
        3.0, ge=0, description="jobs a worker holds beyond max_num_seqs, as a multiple of it"
    )
    max_step_tokens: int = Field(
        ENGINE.max_step_tokens, ge=16, description="tokens computed per step (paged)"
    )
    prefill_chunk_tokens: int = Field(
        ENGINE.prefill_chunk_tokens,
        ge=1,
        description="most prompt tokens of one job prefilled per step (paged): a longer "
        "prompt is prefilled in chunks over several steps, beside the running decodes",
    )
    prefix_cache: bool = ENGINE.prefix_cache
    spec_tokens: int = Field(
        ENGINE.spec_tokens,
        ge=0,
        le=16,
        description="speculative decoding: most tokens drafted by prompt lookup and verified "
        "with one decode (paged); 0 turns it off",
    )
    spec_ngram_max: int = Field(
        ENGINE.spec_ngram_max, ge=1, le=16, description="longest n-gram looked up for drafts"
    )
    spec_ngram_min: int = Field(
        ENGINE.spec_ngram_min, ge=1, le=16, description="shortest n-gram that may draft"
    )
    spec_max_running: int = Field(
        ENGINE.spec_max_running,
        ge=1,
        description="no drafting in a step with more sequences decoding than this",
    )
    spec_min_acceptance: float = Field(
        ENGINE.spec_min_acceptance,
        ge=0.0,
        le=1.0,
        description="a job accepting a smaller share of its recent drafts mostly stops drafting",
    )
    cache_secret: str = Field(
        default_factory=lambda: secrets.token_hex(16),
        description="keys per-tenant prefix-cache salts; random per process when unset",
    )
    worker_name: str | None = Field(
        None, description="unique per running worker; default: host:pid:random (per process)"
    )
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
    tenant_key: str | None = Field(
        None, min_length=MIN_KEY_CHARS, description="the client's tenant signing key"
    )
    tenant_keys: str = Field(
        "",
        description="worker: tenant=key,... whose messages must be signed with one of the "
        "tenant's keys (repeat a tenant to rotate: its first key signs resends)",
    )
    require_signature: bool = Field(
        False, description="worker: refuse messages of tenants without a key in tenant_keys"
    )
    signature_window_s: float = Field(
        300.0, gt=0, description="a signed message's submitted_at must be this close to now"
    )
    # -- webhooks (docs/webhooks.md) --
    webhook_secrets: str = Field(
        "",
        description="worker: tenant=whsec_<base64>,... signs each tenant's webhooks (repeat a "
        "tenant to rotate: every secret listed signs); a tenant without one gets none",
    )
    webhook_allow: str = Field(
        "",
        description="hosts, addresses and CIDR ranges webhooks may call although not public "
        "(loopback, private, ...), and over plain http",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="connect, send and response timeouts of one attempt"
    )
    webhook_retry_for_s: float = Field(
        86_400.0, gt=0, description="a delivery is retried this long after the job ended"
    )
    webhook_backoff_s: float = Field(
        5.0, gt=0, description="the first retry's delay; it doubles per attempt, with jitter"
    )
    webhook_backoff_cap_s: float = Field(1800.0, gt=0, description="the longest retry delay")
    webhook_senders: int = Field(4, ge=1, le=64, description="deliveries a worker runs at once")
    webhook_poll_s: float = Field(
        5.0,
        gt=0,
        description="a worker looks for due deliveries at least this often (its own commits wake "
        "it at once; it sleeps only until the next retry is due)",
    )
    dead_letters_per_minute: int = Field(
        10, ge=0, description="dead letters kept whole per reason and minute; more are folded"
    )
    dead_letter_retention_days: float | None = Field(
        7.0, gt=0, description="the worker deletes older dead letters hourly (None: never)"
    )
    retention_days: float | None = Field(
        None, gt=0, description="the worker deletes ended jobs older than this hourly (None: never)"
    )
    engine_stall_s: float = Field(
        120.0,
        gt=0,
        description="readiness: an engine that computes nothing this long while it has work "
        "makes /readyz fail",
    )
    commit_interval_s: float = Field(
        1.0,
        ge=0,
        description="worker: results are committed at most once per this long (outcomes that "
        "come meanwhile share the transaction); the first after a quiet spell at once",
    )
    unserved_hold_s: float = Field(
        2.0,
        gt=0,
        description="a job for a model this worker does not serve (but a live worker does, or "
        "this one failed to load it) is held this long, then given back to the queue",
    )
    result_backend_url: str | None = Field(
        None,
        description="Redis where workers write results in Celery's format, job streams and "
        "cancel requests (docs/results.md); default: the broker's URL when it is Redis",
    )
    result_expires_s: float = Field(
        86_400.0, gt=0, description="results expire from Redis after this (PostgreSQL keeps them)"
    )
    stream: bool = Field(True, description="worker: stream each job's text deltas to Redis")
    stream_entries_per_s: float = Field(
        125.0,
        gt=0,
        description="worker: the streamer writes about this many stream entries a second at "
        "most: while few jobs stream, each step's text goes at once; with more, each job's "
        "text is gathered over several engine steps",
    )
    stream_expires_s: float = Field(
        3_600.0, gt=0, description="a job's stream expires this long after its last delta"
    )
    result_poll_s: float = Field(
        2.0,
        gt=0,
        description="client: a waiter re-reads its results this often when no notification "
        "came (a lost notification costs this much, not the result)",
    )
    cancel_poll_s: float = Field(
        5.0, gt=0, description="worker: cancel requests are re-read this often (fallback)"
    )
    # -- the OpenAI-compatible gateway (docs/gateway.md) --
    gateway_timeout_s: float = Field(
        600.0, gt=0, description="gateway: how long a request waits for its job (then 504)"
    )
    gateway_max_body_bytes: int = Field(
        4 << 20, ge=1024, description="gateway: a larger request body is refused (413)"
    )
    gateway_max_file_bytes: int = Field(
        200 << 20, ge=1024, description="gateway: a larger uploaded file is refused (413)"
    )
    gateway_key_cache_s: float = Field(
        5.0,
        ge=0,
        description="gateway: API key lookups are cached this long (a revoke "
        "takes at most this long to reach every replica)",
    )
    gateway_models_cache_s: float = Field(
        2.0, ge=0, description="gateway: the live workers' models are re-read this often"
    )
    gateway_batch_sweep_s: float = Field(
        10.0,
        gt=0,
        description="gateway: every replica looks this often (and at start) for batches "
        "that no gateway drives (to resume or to send on)",
    )
    gateway_batch_lease_s: float = Field(
        60.0,
        gt=0,
        description="gateway: the driver of a batch holds it this long past its last step "
        "(a killed gateway's batch is taken on after that)",
    )
    gateway_batch_ahead: int = Field(
        1000,
        ge=1,
        description="gateway: a signed tenant's batch has at most this many jobs queued "
        "and not yet taken (so none waits past INFERQ_SIGNATURE_WINDOW_S)",
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

    @cached_property
    def resolved_result_url(self) -> str | None:
        """The Redis that holds results, streams and cancel requests (None: not Redis)."""
        url = self.result_backend_url or self.resolved_broker_url
        return url if is_redis_url(url) else None

    def engine_config(self, **overrides: Any) -> EngineConfig:
        """The paged engine's config from these settings: every `EngineConfig` field that is
        also a setting, the kernel dir under `home` (`overrides` win: benchmarks)."""
        fields = type(self).model_fields
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(EngineConfig)
            if f.name in fields
        }
        return EngineConfig(**{**values, "kernel_dir": str(self.home / "kernels"), **overrides})

    def served_models(self) -> dict[str, str | None]:
        """Model name -> explicit path (None: a known model, prepared on demand)."""
        served: dict[str, str | None] = {self.model: self.model_path}
        for entry in filter(None, (e.strip() for e in self.models.split(","))):
            name, _, path = entry.partition("=")
            served.setdefault(name.strip(), path.strip() or None)
        return served

    @model_validator(mode="after")
    def _keys_parse(self) -> Settings:
        self.signing_keys()  # a malformed or short key stops a worker (and a client) at start
        self.webhook_signing_secrets()
        self.webhook_policy()
        return self

    def signing_keys(self) -> dict[str, tuple[str, ...]]:
        """Tenant -> its signing keys, from `tenant_keys`, in order: the first signs."""
        keys: dict[str, tuple[str, ...]] = {}
        entries = filter(None, (e.strip() for e in self.tenant_keys.split(",")))
        for n, entry in enumerate(entries, 1):
            tenant, eq, key = (part.strip() for part in entry.partition("="))
            if not (eq and tenant):  # not echoed: it may be a key
                raise ValueError(f"INFERQ_TENANT_KEYS: entry {n} is not tenant=key")
            if len(key) < MIN_KEY_CHARS or not key.isprintable() or not key.isascii():
                raise ValueError(
                    f"INFERQ_TENANT_KEYS: the key of tenant {tenant!r} must be at least "
                    f"{MIN_KEY_CHARS} printable ASCII characters"
                )
            if key not in keys.get(tenant, ()):
                keys[tenant] = (*keys.get(tenant, ()), key)
        return keys

    def webhook_signing_secrets(self) -> dict[str, tuple[str, ...]]:
        """Tenant -> its webhook signing secrets, from `webhook_secrets`, in order."""
        low, high = WEBHOOK_SECRET_BYTES
        out: dict[str, tuple[str, ...]] = {}
        entries = filter(None, (e.strip() for e in self.webhook_secrets.split(",")))
        for n, entry in enumerate(entries, 1):
            tenant, eq, secret = (part.strip() for part in entry.partition("="))
            if not (eq and tenant):  # not echoed: it may be a secret
                raise ValueError(f"INFERQ_WEBHOOK_SECRETS: entry {n} is not tenant=secret")
            try:
                raw = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if not secret.startswith(WEBHOOK_SECRET_PREFIX) or not low <= len(raw) <= high:
                raise ValueError(
                    f"INFERQ_WEBHOOK_SECRETS: the secret of tenant {tenant!r} must be "
                    f"{WEBHOOK_SECRET_PREFIX}<base64 of {low} to {high} bytes>"
                )
            if secret not in out.get(tenant, ()):
                out[tenant] = (*out.get(tenant, ()), secret)
        return out

    def webhook_policy(self) -> CallbackPolicy:
        """Which hosts webhooks may call beyond public ones (`webhook_allow`)."""
        return CallbackPolicy.parse(self.webhook_allow)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def model_registry(self) -> Path:
        """The models added with `inferq model add`: a JSON file under `home`."""
        return self.home / "models.json"

    def registered_models(self) -> dict[str, dict[str, Any]]:
        """Name -> registration (`path`, what was checked) of each added model."""
        if not self.model_registry.is_file():
            return {}
        return dict(json.loads(self.model_registry.read_text()).get("models", {}))

    @property
    def embedded(self) -> bool:
        return self.broker_url is None


def get_settings(**overrides: object) -> Settings:
    """Fresh settings from the environment, with explicit overrides on top."""
    settings = Settings(**overrides)  # type: ignore[arg-type]
    settings.home.mkdir(parents=True, exist_ok=True)
    return settings
