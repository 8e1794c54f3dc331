"""Batch formation: pure Python over job ids and token counts (no torch, no I/O)."""

from scheduler.batching import (
    BatchPolicy,
    PendingJob,
    batch_cost,
    effective_class,
    form_batches,
    next_batch,
)

__all__ = [
    "BatchPolicy",
    "PendingJob",
    "batch_cost",
    "effective_class",
    "form_batches",
    "next_batch",
]
