"""Webhooks: the sender threads (`sender.py`) and one signed, SSRF-checked attempt
(`delivery.py`); the outbox and attempt rows are `storage.webhooks`, the URL rules
`inferq.callback_urls` (docs/webhooks.md)."""

from worker.webhooks.sender import WebhookSender

__all__ = ["WebhookSender"]
