"""The worker: `service/` runs queued jobs on a few threads around the engines; `engine/` is
the inference engine (while serving, the only code that holds tensors); `prep/` prepares models
before a worker starts; `data/` holds the GPTQ calibration set and the held-out text that
measures a quantized model."""
