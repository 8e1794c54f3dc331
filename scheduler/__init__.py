"""Batch formation: pure Python over job ids and token counts (no torch, no I/O)."""
