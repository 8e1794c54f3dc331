"""A batch's output and error files, line by line (OpenAI's format): one line per
`custom_id`, the output file for requests that succeeded, the error file for the rest.

    {"id": "batch_req_<job>", "custom_id": "...", "response": {"status_code": 200,
     "request_id": "<job id>", "body": <chat.completion | text_completion>}, "error": null}
"""

from __future__ import annotations

import json
from typing import Any

from gateway.responses import Answer, Kind
from storage.batch_store import OutputLine
from storage.records import ResultRow

KINDS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
REFUSED_STATUS = {"rate_limit_exceeded": 429}  # by the refusal's code; others 400


def _line(row: OutputLine, response: dict[str, Any] | None, error: Any = None) -> str:
    ref = row.job_id.hex if row.job_id else f"line{row.line_no}"
    body = {
        "id": f"batch_req_{ref}",
        "custom_id": row.custom_id,
        "response": response,
        "error": error,
    }
    return json.dumps(body, separators=(",", ":")) + "\n"


def _response(row: OutputLine, status: int, body: dict[str, Any]) -> dict[str, Any]:
    request_id = str(row.job_id) if row.job_id else None
    return {"status_code": status, "request_id": request_id, "body": body}


def _error(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def render(batch: dict[str, Any], row: OutputLine) -> tuple[str, str] | None:
    """Which file the row goes to (`output` or `error`) and its line; None while its job
    has not ended (a batch finalized past its window lists those as expired)."""
    if row.refused is not None:  # 400, or 429 for a line over its tenant's quota alone
        body = json.loads(row.refused)
        status = REFUSED_STATUS.get(body["error"].get("code"), 400)
        return "error", _line(row, _response(row, status, body))
    if row.status == "done" and row.text is not None:
        created = int(row.finished_at.timestamp()) if row.finished_at else 0
        answer = Answer(KINDS[batch["endpoint"]], row.job_id, row.model or "", created)
        result = ResultRow(
            row.job_id,
            row.text,
            row.finish_reason or "stop",
            row.prompt_tokens or 0,
            row.completion_tokens or 0,
            row.cached_tokens or 0,
        )
        return "output", _line(row, _response(row, 200, answer.complete(result)))
    if row.status in ("failed", "cancelled"):
        status, code = (500, "job_failed") if row.status == "failed" else (409, "job_cancelled")
        message = f"job {row.status}: {row.error or row.status}"
        return "error", _line(row, _response(row, status, _error(message, "server_error", code)))
    if row.status == "expired" or batch["status"] in ("expired", "cancelled"):
        code = "batch_cancelled" if batch["status"] == "cancelled" else "batch_expired"
        text = "This request could not be executed before the batch ended."
        return "error", _line(row, None, {"code": code, "message": text})
    return None


def output_lines(batch: dict[str, Any], rows: list[OutputLine], kind: str) -> str:
    """The lines of `kind` (output or error) among these rows."""
    out = []
    for row in rows:
        got = render(batch, row)
        if got is not None and got[0] == kind:
            out.append(got[1])
    return "".join(out)
