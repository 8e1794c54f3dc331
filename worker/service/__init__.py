"""The worker service: threads around the engines. The intake takes messages from the queue
(the Redis fast path, or kombu), claims and tokenizes the jobs and hands them to the engine loop
(the only thread that touches an engine); their outcomes go to the result sink (the only writer
of results). The sweeper beats this worker's heartbeat and sends lost jobs again, housekeeping
applies retention, and an HTTP endpoint serves metrics and health. `worker.service.app` wires
them."""
