"""`inferq serve` runs uvicorn on httptools' parser and uvloop's loop when they import ([gateway]
installs both), on h11 and asyncio when they do not, and says which on its start line. The
uvicorn Config it would run is built and loaded; no server starts."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import pytest
import uvicorn
import uvloop
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inferq import logs
from inferq.cli import main


def _served_config(monkeypatch: pytest.MonkeyPatch) -> uvicorn.Config:
    """The Config `inferq serve` hands uvicorn, loaded (its protocol class imported)."""
    calls: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls.append(self.config))
    monkeypatch.setattr(logs, "configure_logging", lambda level: None)  # json_logs' stays
    assert main(["serve", "--port", "0"]) == 0
    (config,) = calls
    config.load()
    return config


def test_serve_runs_httptools_and_uvloop(
    monkeypatch: pytest.MonkeyPatch, json_logs: Callable[[], list[dict]]
) -> None:
    config = _served_config(monkeypatch)
    assert config.http_protocol_class is HttpToolsProtocol
    assert config.get_loop_factory() is uvloop.new_event_loop
    (line,) = [x for x in json_logs() if x["event"] == "gateway.serve"]
    assert (line["loop"], line["http"], line["port"]) == ("uvloop", "httptools", 0)


def test_serve_falls_back_to_h11_and_asyncio_without_them(
    monkeypatch: pytest.MonkeyPatch, json_logs: Callable[[], list[dict]]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` fails
    monkeypatch.setitem(sys.modules, "httptools", None)
    config = _served_config(monkeypatch)
    assert config.http_protocol_class is H11Protocol
    assert config.get_loop_factory() is asyncio.SelectorEventLoop
    (line,) = [x for x in json_logs() if x["event"] == "gateway.serve"]
    assert (line["loop"], line["http"]) == ("asyncio", "h11")
