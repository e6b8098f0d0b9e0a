"""The studio against a separate GPU worker (`INFERENCE_URL`), as on Modal: a full worker, a cold container
that holds the socket until its model is loaded, and a hidden tab that the worker closes as idle."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.protocol import Ready
from tests.conftest import ROOT, AppProcess, clean_environment, sign_in, stop_process, wait_until_healthy
from tests.inference.helpers import StreamClient, webcam_jpeg
from tests.inference.test_ticket_single_use_e2e import signed_in
from tests.live_server import free_port
from tests.studio.wire import WireLog, start_streaming, wait_until

pytestmark = pytest.mark.browser

SECRET = "a-stream-secret-shared-by-app-and-worker-0123456789"


@contextlib.contextmanager
def worker_process(tmp_path: Path, port: int, app: AppProcess, **env: str) -> Iterator[str]:
    """`python -m inference` with the preview engine on `port`, reporting to the app; yields its URL."""
    log_path = tmp_path / f"worker-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "inference", "--port", str(port), "--engine", "preview"],
            cwd=ROOT,
            env=clean_environment(
                STREAM_SECRET=SECRET,
                USAGE_REPORT_URL=f"{app.url}/api/usage/report",
                PYTHONPATH=str(ROOT),
                **env,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", log_path, "python -m inference")
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        stop_process(process)


class HoldingProxy:
    """A TCP relay that keeps each new connection waiting `hold` seconds before it reaches the worker, as
    Modal keeps a socket until a cold container's `@modal.enter` has finished."""

    def __init__(self, target_port: int, hold: float) -> None:
        self.target_port = target_port
        self.hold = hold
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HoldingProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.hold)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


def _app_for_worker(start_app: Callable[..., AppProcess], worker_url: str) -> AppProcess:
    """The app, pointing the studio at a worker of its own (which may not be up yet)."""
    return start_app(STREAM_SECRET=SECRET, INFERENCE_URL=worker_url)


def _other_viewers_ticket(app: AppProcess) -> str:
    """A ticket the app issues to another signed-in user, over HTTP as the studio gets one."""
    client, csrf = signed_in(app, "other-viewer@example.com")
    answer = client.post("/api/stream/ticket", headers={"x-csrftoken": csrf})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["ticket"])


def _status(page: Any) -> tuple[str, str]:
    status = page.locator("[data-testid=status]")
    return status.get_attribute("data-state") or "", status.inner_text()


def test_a_full_worker_shows_busy_and_the_studio_streams_once_a_place_is_free(
    start_app: Callable[..., AppProcess], page: Any, tmp_path: Path
) -> None:
    port = free_port()
    app = _app_for_worker(start_app, f"ws://127.0.0.1:{port}/ws")
    # At least 200 ms a frame: one session keeps 2.5 FPS, two would not.
    with worker_process(tmp_path, port, app, PREVIEW_DELAY_MS="200", MIN_SESSION_FPS="2.5") as ws_url:
        with StreamClient.connect(ws_url) as other:  # another viewer (a ticket of its own) holds the GPU
            other.send_hello(_other_viewers_ticket(app))
            other.receive_until(lambda message: isinstance(message, Ready), timeout=20)
            for frame_id in range(1, 4):
                other.send_frame(frame_id, webcam_jpeg(160, 120))
                other.frame(frame_id, timeout=20)
            wire = WireLog()
            wire.attach(page)
            sign_in(page, app.url, "waiting@example.com")
            page.click("[data-testid=start]")
            page.wait_for_selector("[data-testid=status][data-state=busy]", timeout=30_000)
            assert _status(page)[1].startswith("All GPUs are busy")
            assert not page.is_visible("[data-testid=paywall]")
            assert wire.frames() == 0
        # The other viewer left: the studio's next try is admitted and streams.
        page.wait_for_selector("[data-testid=status][data-state=streaming]", timeout=60_000)
        wait_until(page, lambda: wire.frames() >= 2, 60, "styled frames once admitted")


def test_a_cold_worker_shows_starting_and_streams_without_a_failure(
    start_app: Callable[..., AppProcess], page: Any, tmp_path: Path
) -> None:
    port = free_port()
    with HoldingProxy(port, hold=4.0) as proxy:
        app = _app_for_worker(start_app, f"ws://127.0.0.1:{proxy.port}/ws")
        with worker_process(tmp_path, port, app):
            wire = WireLog()
            wire.attach(page)
            sign_in(page, app.url, "early@example.com")
            page.click("[data-testid=start]")
            time.sleep(1.5)  # the socket is still held, as by a container loading its model
            state, text = _status(page)
            assert state == "connecting"
            assert text.startswith("Starting a GPU — not billed")
            page.wait_for_selector("[data-testid=status][data-state=streaming]", timeout=30_000)
            wait_until(page, lambda: wire.frames() >= 2, 30, "styled frames")
            assert len(wire.sockets) == 1  # no failed first attempt, no reconnect


def test_a_hidden_tab_is_paused_by_the_worker_and_resumes_when_seen_again(
    start_app: Callable[..., AppProcess], page: Any, tmp_path: Path
) -> None:
    port = free_port()
    app = _app_for_worker(start_app, f"ws://127.0.0.1:{port}/ws")
    with worker_process(tmp_path, port, app, IDLE_TIMEOUT_SECONDS="2"):
        wire = start_streaming(page, app, "away@example.com")
        wait_until(page, lambda: wire.frames() >= 3, 30, "styled frames")
        _set_hidden(page, True)
        page.wait_for_selector("[data-testid=status][data-state=paused]", timeout=20_000)
        assert _status(page)[1].startswith("Paused")
        seen = wire.frames()
        _set_hidden(page, False)
        page.wait_for_selector("[data-testid=status][data-state=streaming]", timeout=30_000)
        wait_until(page, lambda: wire.frames() >= seen + 3, 30, "frames after the tab is back")
        assert len(wire.sockets) == 2  # a new socket with a new ticket


def _set_hidden(page: Any, hidden: bool) -> None:
    # What the browser does when the tab goes to the background: the page reads `document.hidden`.
    page.evaluate(
        """(hidden) => {
            Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
            Object.defineProperty(document, "visibilityState", {
                configurable: true, get: () => (hidden ? "hidden" : "visible"),
            });
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )
