"""Run an ASGI app with uvicorn on a free loopback port in a background thread, for tests that need a
real socket (SDKs over HTTP, WebSockets, browsers)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any, port: int | None = None, *, lifespan: str = "on", **options: Any) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL, e.g. "http://127.0.0.1:54321". `options` are
    further uvicorn settings."""
    # The socket is bound here and handed to uvicorn: a port picked first and bound later can be taken in
    # between by another test's server (two workers, and the subprocesses they start).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on one port, as uvicorn does
        sock.bind(("127.0.0.1", port or 0))
        port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan, **options
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
        )
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"test server on port {port} did not start")
                time.sleep(0.02)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
