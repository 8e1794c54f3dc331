"""Continuous batching over the paged KV cache: pure Python (no torch, no I/O)."""

from scheduler.continuous import ContinuousScheduler
from scheduler.plan import DecodeWork, PrefillWork, StepPlan
from scheduler.sequence import SeqStatus, Sequence
from scheduler.speculation import Speculation

__all__ = [
    "ContinuousScheduler",
    "DecodeWork",
    "PrefillWork",
    "SeqStatus",
    "Sequence",
    "Speculation",
    "StepPlan",
]
