"""What a backend app imports to submit inferq jobs and read their results, through the
broker's Redis alone (docs/results.md)."""

from api_client.aio import AsyncInferqClient
from api_client.client import InferqClient
from api_client.producer import InvalidJobError, ResultsUnavailable
from api_client.results import JobExpired, JobFailed
from api_client.schema import ChatMessage, JobMessage, SamplingParams

__all__ = [
    "AsyncInferqClient",
    "ChatMessage",
    "InferqClient",
    "InvalidJobError",
    "JobExpired",
    "JobFailed",
    "JobMessage",
    "ResultsUnavailable",
    "SamplingParams",
]
