"""Workers: the Celery app and its runtime; `engine/` is the inference engine (the only owner
of tensors), `prep/` prepares models before a worker starts."""
