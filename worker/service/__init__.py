"""The worker service: intake (messages in), the engine loop (the only thread that touches
an engine) and the result sink (the only writer of results); `worker.service.app` wires them."""
