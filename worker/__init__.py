"""Workers: the Celery app, the in-process batcher, model preparation and the model
runner (the only owner of tensors)."""
