"""The inference engine: continuous batching (`scheduler/`) over a paged, prefix-cached KV cache
(`kv/`), running transformers models with fp32, bf16 or GPTQ 4-bit weights.

`api` is the contract (no torch). `engine.PagedEngine` runs the models; `null.NullEngine` is a
torch-free stand-in for service tests and benchmarks. Nothing here imports the service (queue,
database, settings: tests/unit/test_import_contracts.py); its only I/O is loading a model and
its tokenizer, and the C kernels `native` compiles and caches on first use.
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
