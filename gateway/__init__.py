"""An OpenAI-compatible HTTP gateway in front of the job queue (docs/gateway.md): it checks a
tenant's API key, validates, enqueues with the same wire contract as any producer
(`AsyncInferqClient`), and answers from the results path. Stateless: run as many as wanted."""

from gateway.app import create_app

__all__ = ["create_app"]
