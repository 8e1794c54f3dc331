"""Batch formation: pure Python over job ids and token counts (no torch, no I/O)."""

from scheduler.batching import (
    BatchPolicy,
    PendingJob,
    batch_cost,
    effective_class,
    form_batches,
    next_batch,
)
from scheduler.continuous import (
    ContinuousScheduler,
    DecodeWork,
    PrefillWork,
    SeqState,
    StepPlan,
)

__all__ = [
    "BatchPolicy",
    "ContinuousScheduler",
    "DecodeWork",
    "PendingJob",
    "PrefillWork",
    "SeqState",
    "StepPlan",
    "batch_cost",
    "effective_class",
    "form_batches",
    "next_batch",
]
