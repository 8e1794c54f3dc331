"""The inference engine: continuous batching over a paged, prefix-cached KV cache.

`api` is the contract (no torch). `engine.PagedEngine` runs transformers models; `null.
NullEngine` is a torch-free stand-in for service tests and benchmarks. Nothing here does I/O
beyond loading weights, and nothing imports the service (celery, storage, settings).
"""

from worker.engine.api import (
    Codec,
    Engine,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    SamplingParams,
    run_to_completion,
)

__all__ = [
    "Codec",
    "Engine",
    "EngineOutput",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "SamplingParams",
    "run_to_completion",
]
