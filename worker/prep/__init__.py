"""Model preparation: fetch and convert the known models, quantize GPTQ variants. Runs once
per model before any worker starts; the engine never imports it."""
