"""The studio in headless Chromium with a fake webcam, against `python -m app` in sandbox mode."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.conftest import AppProcess, save_screenshot, sign_in

pytestmark = pytest.mark.browser

FRAME_HEADER_BYTES = 8


@dataclass
class WireLog:
    """What crossed the studio's WebSockets, as Chromium saw it."""

    sockets: list[str] = field(default_factory=list)
    sent: dict[int, float] = field(default_factory=dict)  # frame id -> monotonic time sent
    received: list[tuple[int, float]] = field(default_factory=list)  # (frame id, time) of output frames
    max_unanswered: int = 0
    text_in: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, page: Any) -> None:
        def on_socket(socket: Any) -> None:
            self.sockets.append(socket.url)
            socket.on("framesent", self._sent)
            socket.on("framereceived", self._received)

        page.on("websocket", on_socket)

    def _sent(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes) and len(payload) > FRAME_HEADER_BYTES:
            with self.lock:
                self.sent[int.from_bytes(payload[:4], "little")] = time.monotonic()
                self.max_unanswered = max(self.max_unanswered, self._unanswered())

    def _received(self, payload: str | bytes) -> None:
        with self.lock:
            if isinstance(payload, bytes):
                self.received.append((int.from_bytes(payload[:4], "little"), time.monotonic()))
            else:
                self.text_in.append(payload)

    def _unanswered(self) -> int:
        # The worker keeps only the latest frame per session, so an answer to id N settles every id <= N.
        answered = max((frame_id for frame_id, _ in self.received), default=0)
        return sum(1 for frame_id in self.sent if frame_id > answered)

    def frames(self) -> int:
        with self.lock:
            return len(self.received)

    def latencies(self) -> list[float]:
        with self.lock:
            return [at - self.sent[frame_id] for frame_id, at in self.received if frame_id in self.sent]


def wait_until(page: Any, condition: Callable[[], bool], timeout: float, what: str) -> None:
    # Playwright's sync API delivers events only while the test is inside a Playwright call, so waiting
    # is done with page.wait_for_timeout, never time.sleep.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(50)


def output_colour(page: Any) -> list[float]:
    """The mean red, green and blue of the output canvas: a style's palette, whatever the camera shows."""
    return page.evaluate(
        """() => {
          const canvas = document.getElementById('output');
          const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
          const sums = [0, 0, 0];
          for (let i = 0; i < data.length; i += 4) {
            sums[0] += data[i]; sums[1] += data[i + 1]; sums[2] += data[i + 2];
          }
          return sums.map((sum) => sum / (data.length / 4));
        }"""
    )


def difference(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def start_streaming(page: Any, app: AppProcess, email: str) -> WireLog:
    wire = WireLog()
    wire.attach(page)
    sign_in(page, app.url, email)
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=status][data-state=streaming]", timeout=30_000)
    return wire


def test_stream_frames_and_switch_style_live(start_app: Callable[..., AppProcess], page: Any) -> None:
    app = start_app()
    page.goto(f"{app.url}/sign-in")
    wire = start_streaming(page, app, "streamer@example.com")
    wait_until(page, lambda: wire.frames() >= 20, 60, "20 styled frames")
    save_screenshot(page, "studio-streaming")
    assert float(page.inner_text("[data-testid=fps]")) > 0

    def switch_to(preset: str) -> None:
        # Wait for frames sent after the click to come back, however slow the machine is.
        page.click(f"[data-testid=preset-{preset}]")
        seen = wire.frames()
        wait_until(page, lambda: wire.frames() >= seen + 6, 30, f"frames in the {preset} style")

    oil_style = output_colour(page)  # the default preset
    seen = wire.frames()
    wait_until(page, lambda: wire.frames() >= seen + 5, 30, "a few more oil-painting frames")
    oil_style_later = output_colour(page)
    switch_to("neon")
    neon_style = output_colour(page)

    # The style change shows in the picture far beyond the camera's own motion between two frames...
    assert difference(oil_style, neon_style) > 3 * max(difference(oil_style, oil_style_later), 2.0)
    # ...and it happened on the same socket: no reconnect.
    assert len(wire.sockets) == 1
    frames_before = wire.frames()
    wait_until(page, lambda: wire.frames() > frames_before + 5, 20, "frames keep flowing after the switch")

    page.click("[data-testid=stop]")
    page.wait_for_selector("[data-testid=status][data-state=idle]")


def test_snapshot_and_recording_downloads(start_app: Callable[..., AppProcess], page: Any) -> None:
    app = start_app()
    wire = start_streaming(page, app, "recorder@example.com")
    wait_until(page, lambda: wire.frames() >= 5, 60, "first styled frames")

    with page.expect_download() as snapshot_download:
        page.click("[data-testid=snapshot]")
    snapshot = snapshot_download.value
    assert snapshot.suggested_filename.endswith(".png")
    image = Image.open(snapshot.path())
    assert image.format == "PNG"
    assert image.size == (512, 512)

    page.click("[data-testid=record]")
    assert page.get_attribute("[data-testid=record]", "aria-pressed") == "true"
    page.wait_for_timeout(3000)
    with page.expect_download(timeout=20_000) as recording_download:
        page.click("[data-testid=record]")
    recording = recording_download.value
    assert recording.suggested_filename.endswith(".webm")
    data = Path(recording.path()).read_bytes()
    assert data[:4] == b"\x1a\x45\xdf\xa3"  # EBML header
    with av.open(io.BytesIO(data)) as container:
        decoded = [frame for frame in container.decode(video=0)]
    assert len(decoded) >= 1
    assert (decoded[0].width, decoded[0].height) == (512, 512)


def test_flow_control_with_a_slow_engine(start_app: Callable[..., AppProcess], page: Any) -> None:
    app = start_app(PREVIEW_DELAY_MS="250")
    wire = start_streaming(page, app, "slow@example.com")
    wait_until(page, lambda: wire.frames() >= 12, 60, "frames from the slow engine")
    page.wait_for_timeout(2000)
    # Never more than two frames unanswered, so nothing queues up anywhere...
    assert wire.max_unanswered <= 2
    # ...and latency stays near the render time instead of growing with a backlog.
    latencies = wire.latencies()
    late = latencies[len(latencies) // 2 :]
    assert max(late) < 1.5, f"latency grew: {late}"


def test_running_out_of_minutes_shows_the_paywall(start_app: Callable[..., AppProcess], page: Any) -> None:
    app = start_app(FREE_PLAN_SECONDS="3")
    wire = WireLog()
    wire.attach(page)
    sign_in(page, app.url, "frugal@example.com")
    # A locator assertion, not wait_for_function: a string predicate is eval'd, which the page's CSP refuses.
    expect(page.locator("[data-testid=usage-meter]")).not_to_contain_text("Loading", timeout=15_000)
    save_screenshot(page, "studio-idle")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=paywall][open]", timeout=30_000)
    assert page.get_attribute("[data-testid=status]", "data-state") == "out-of-minutes"
    page.wait_for_selector("[data-testid=paywall] [data-testid=choose-pro]")
    save_screenshot(page, "studio-paywall")
    assert wire.frames() >= 1  # it streamed before it stopped by itself

    page.click("[data-testid=paywall] [data-testid=choose-pro]")
    page.wait_for_selector("[data-testid=pay]", timeout=20_000)
    assert "/sandbox/chargebee/" in page.url
