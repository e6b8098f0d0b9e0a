"""The two commands that serve `/ws` to browsers, started as a user starts them, decline per-message
compression: frames are JPEG, which deflate cannot shrink, so compressing them only adds latency."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.conftest import ROOT, AppProcess, clean_environment, stop_process, wait_until_healthy
from tests.inference.helpers import SECRET
from tests.live_server import free_port


@pytest.fixture
def standalone_worker(tmp_path: Path) -> Iterator[str]:
    """`python -m inference` with the preview engine; yields its base URL."""
    port = free_port()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "inference", "--port", str(port), "--engine", "preview"],
            cwd=tmp_path,
            env=clean_environment(PYTHONPATH=str(ROOT), STREAM_SECRET=SECRET),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, log_path, "python -m inference")
        yield url
    finally:
        stop_process(process)


def negotiated_extensions(base_url: str) -> tuple[str, str | None]:
    """(what the client offered, what the server accepted) in the WebSocket handshake of `/ws`."""
    with connect(base_url.replace("http://", "ws://") + "/ws", open_timeout=10) as socket:
        assert socket.response is not None
        offered = socket.request.headers["Sec-WebSocket-Extensions"] if socket.request else ""
        return offered, socket.response.headers.get("Sec-WebSocket-Extensions")


def test_the_standalone_worker_declines_per_message_deflate(standalone_worker: str) -> None:
    offered, accepted = negotiated_extensions(standalone_worker)
    assert "permessage-deflate" in offered  # as every browser does
    assert accepted is None


def test_the_sandbox_app_declines_per_message_deflate(start_app: Callable[..., AppProcess]) -> None:
    offered, accepted = negotiated_extensions(start_app().url)
    assert "permessage-deflate" in offered
    assert accepted is None
