"""What a backend app imports to submit inferq jobs and read their results."""

from api_client.client import InferqClient, InvalidJobError
from api_client.schema import ChatMessage, JobMessage, SamplingParams

__all__ = ["ChatMessage", "InferqClient", "InvalidJobError", "JobMessage", "SamplingParams"]
