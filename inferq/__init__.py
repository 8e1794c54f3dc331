"""inferq: queue-driven, micro-batched LLM inference with results in PostgreSQL."""
