"""A Node backend with nothing of inferq installed: the official `openai` npm package
(tests/node, installed with `npm install` there) enqueues through the gateway and reads the
results, against a real worker on the null engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from gateway_helpers import new_key, serving
from service_helpers import records, running_worker

from worker.engine.null import NullEngine

pytestmark = pytest.mark.services
NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node without npm: cannot install the openai package"
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return exe


def test_the_openai_npm_package_chats_streams_and_lists_models(node, service_settings) -> None:
    settings = service_settings.model_copy(update={"model": "null"})
    with running_worker(settings, {"null": NullEngine()}), serving(settings) as url:
        env = {
            **os.environ,
            "OPENAI_BASE_URL": url,
            "MODEL": "null",
            "OPENAI_API_KEY": new_key(settings, "node-app"),
        }
        ran = subprocess.run(
            [node, "gateway_check.mjs"],
            cwd=NODE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    job_id = uuid.UUID(out["jobId"])
    done = out["done"]
    assert done["id"] == f"chatcmpl-{job_id.hex}" and done["object"] == "chat.completion"
    assert done["choices"][0]["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 4
    chunks = out["chunks"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert out["completion"]["usage"]["completion_tokens"] == 2
    assert out["models"] == ["null"]
    assert out["refused"] == {"status": 400, "param": "n", "type": "invalid_request_error"}
    assert records(settings).get(job_id).tenant == "node-app"  # the key's tenant, in the record
