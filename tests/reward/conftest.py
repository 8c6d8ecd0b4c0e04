"""Fixtures of the reward tests: the stub judge server from tools/ (a real local HTTP server)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from judge_stub_server import JudgeStubServer


@pytest.fixture
def judge_server():
    """A factory: ``judge_server(mode, **kwargs)`` starts a stub judge, stopped after the test."""
    servers: list[JudgeStubServer] = []

    def start(mode: str = "ok", **kwargs) -> JudgeStubServer:
        server = JudgeStubServer(mode, **kwargs).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
