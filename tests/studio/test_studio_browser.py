"""The studio in headless Chromium with a fake webcam, against `python -m app` in sandbox mode."""

from __future__ import annotations

import io
import itertools
import json
import re
import statistics
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
    render_ms: list[int] = field(default_factory=list)  # the worker's render time of each output frame
    waited_ms: list[int] = field(default_factory=list)  # and how long its input waited for the engine
    acked: set[int] = field(default_factory=set)  # frame ids acknowledged, or refused with an error
    max_unacked: int = 0
    text_in: list[str] = field(default_factory=list)
    text_out: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, page: Any) -> None:
        def on_socket(socket: Any) -> None:
            self.sockets.append(socket.url)
            socket.on("framesent", self._sent)
            socket.on("framereceived", self._received)

        page.on("websocket", on_socket)

    def _sent(self, payload: str | bytes) -> None:
        with self.lock:
            if isinstance(payload, str):
                self.text_out.append(payload)
            elif len(payload) > FRAME_HEADER_BYTES:
                self.sent[int.from_bytes(payload[:4], "little")] = time.monotonic()
                self.max_unacked = max(self.max_unacked, self._unacked())

    def _received(self, payload: str | bytes) -> None:
        with self.lock:
            if isinstance(payload, bytes):
                self.received.append((int.from_bytes(payload[:4], "little"), time.monotonic()))
                self.render_ms.append(int.from_bytes(payload[4:6], "little"))
                self.waited_ms.append(int.from_bytes(payload[6:8], "little", signed=True))
                return
            self.text_in.append(payload)
            message = json.loads(payload)
            if message.get("type") == "ack" or message.get("frame") is not None:
                self.acked.add(message["frame"])

    def _unacked(self) -> int:
        # Frames the worker has neither acknowledged nor refused (an output for id N also settles every
        # id <= N, for safety: it is always preceded by the acks).
        answered = max((frame_id for frame_id, _ in self.received), default=0)
        return sum(1 for frame_id in self.sent if frame_id > answered and frame_id not in self.acked)

    def messages(self, kind: str, direction: str = "in") -> list[dict[str, Any]]:
        with self.lock:
            texts = list(self.text_in if direction == "in" else self.text_out)
        return [message for message in map(json.loads, texts) if message.get("type") == kind]

    def frames(self) -> int:
        with self.lock:
            return len(self.received)

    def latencies(self) -> list[float]:
        with self.lock:
            return [at - self.sent[frame_id] for frame_id, at in self.received if frame_id in self.sent]

    def settled(self) -> tuple[list[float], float]:
        """The second half's send-to-receive latencies, and its median render time, in seconds: the
        stream once it has settled."""
        latencies = self.latencies()
        with self.lock:
            render_ms = self.render_ms[len(self.render_ms) // 2 :]
        return latencies[len(latencies) // 2 :], statistics.median(render_ms) / 1000


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


def test_a_slow_engine_gets_paced_frames_at_about_one_render_of_latency(
    start_app: Callable[..., AppProcess], page: Any
) -> None:
    app = start_app(PREVIEW_DELAY_MS="250")  # one frame per engine call: `ready` asks the studio to pace
    wire = start_streaming(page, app, "slow@example.com")
    (ready,) = wire.messages("ready")
    assert ready["pace"] is True
    wait_until(page, lambda: wire.frames() >= 12, 60, "frames from the slow engine")
    page.wait_for_timeout(1000)
    # Never more than two frames unacknowledged, every frame acknowledged...
    assert wire.max_unacked <= 2
    assert len(wire.messages("ack")) >= len(wire.sent) - 2
    # ...and one frame sent per render, not a camera's worth replaced unrendered in the worker...
    assert len(wire.sent) <= 1.2 * wire.frames() + 3, (len(wire.sent), wire.frames())
    # ...each timed to arrive just before the engine is free: latency is one render and a little.
    late, render_seconds = wire.settled()
    assert statistics.median(late) < 1.3 * render_seconds, (late, render_seconds)
    # The engine was kept busy: outputs came about one render apart.
    with wire.lock:
        arrivals = [at for _, at in wire.received][len(wire.received) // 2 :]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert statistics.median(gaps) < 1.3 * render_seconds, (gaps, render_seconds)


def test_a_batching_worker_gets_frames_at_camera_rate(
    start_app: Callable[..., AppProcess], page: Any
) -> None:
    app = start_app(PREVIEW_DELAY_MS="250", MAX_BATCH="4")  # batches sessions: `ready` says not to pace
    wire = start_streaming(page, app, "batching@example.com")
    (ready,) = wire.messages("ready")
    assert ready["pace"] is False
    wait_until(page, lambda: wire.frames() >= 8, 60, "frames from the slow engine")
    page.wait_for_timeout(1000)
    assert wire.max_unacked <= 2
    assert len(wire.messages("ack")) >= len(wire.sent) - 2
    # At camera rate most frames are replaced unrendered, so a frame waits at every batch boundary...
    assert len(wire.sent) >= 2 * wire.frames(), (len(wire.sent), wire.frames())
    # ...and the one the engine picks is at most a camera interval old: latency is about one render, not a
    # render plus a queue (two frames unanswered made it two renders).
    late, render_seconds = wire.settled()
    assert max(late) < 1.5, f"latency grew: {late}"
    assert statistics.median(late) < 1.6 * render_seconds, (late, render_seconds)


def test_quality_select_lists_the_engines_modes(start_app: Callable[..., AppProcess], page: Any) -> None:
    app = start_app()
    wire = start_streaming(page, app, "modes@example.com")
    (ready,) = wire.messages("ready")
    assert [mode["id"] for mode in ready["modes"]] == ["preview"]
    select = page.locator("[data-testid=mode]")
    expect(select).to_be_visible()
    expect(select.locator("option")).to_have_count(1)
    expect(select.locator("option")).to_have_text("Preview")
    expect(select).to_have_value("preview")
    expect(select).to_be_disabled()  # one mode: nothing to choose
    expect(page.locator("#mode-help")).to_contain_text("Classical filters")
    expect(page.locator("[data-testid=mode-label]")).to_have_text("Preview")
    save_screenshot(page, "studio-quality")
    # The studio says which mode it wants, with the rest of the params, as soon as the engine is ready...
    wait_until(page, lambda: bool(wire.messages("params", "out")), 10, "params")
    assert wire.messages("params", "out")[-1]["mode"] == "preview"
    # ...and again, live on the same socket, whenever the choice changes.
    sent = len(wire.messages("params", "out"))
    select.evaluate("(select) => select.dispatchEvent(new Event('change'))")
    wait_until(page, lambda: len(wire.messages("params", "out")) > sent, 10, "params after a change")
    assert wire.messages("params", "out")[-1]["mode"] == "preview"
    assert len(wire.sockets) == 1
    assert not wire.messages("error")


FLUX_LIKE_MODES = [
    {
        "id": "exact",
        "label": "Exact",
        "approximate": False,
        "detail": "The reference pipeline, within rounding.",
    },
    {
        "id": "fast",
        "label": "Fast",
        "approximate": True,
        "detail": "Fewer prompt tokens: close, not identical.",
    },
    {"id": "turbo", "label": "Turbo", "approximate": True, "detail": "One step in FP8: visibly different."},
]


def test_choosing_a_quality_mode_applies_it_live(start_app: Callable[..., AppProcess], page: Any) -> None:
    """The sandbox's preview engine has one mode, so the socket is relayed through the test, which offers
    the page three modes like FLUX.2's and keeps the preview worker from seeing mode ids it lacks."""
    app = start_app()
    connections: list[str] = []
    params: list[dict[str, Any]] = []

    def relay(route: Any) -> None:
        connections.append(route.url)
        server = route.connect_to_server()

        def to_worker(message: str | bytes) -> None:
            if isinstance(message, str) and json.loads(message).get("type") == "params":
                sent = json.loads(message)
                params.append(dict(sent))
                sent.pop("mode", None)
                message = json.dumps(sent)
            server.send(message)

        def to_page(message: str | bytes) -> None:
            if isinstance(message, str) and json.loads(message).get("type") == "ready":
                message = json.dumps({**json.loads(message), "modes": FLUX_LIKE_MODES, "mode": "exact"})
            route.send(message)

        route.on_message(to_worker)
        server.on_message(to_page)

    page.route_web_socket(re.compile(r"^wss?://"), relay)
    sign_in(page, app.url, "quality@example.com")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=status][data-state=streaming]", timeout=30_000)

    select = page.locator("[data-testid=mode]")
    expect(select).to_be_enabled()
    expect(select.locator("option")).to_have_text(["Exact", "Fast — approximate", "Turbo — approximate"])
    expect(select).to_have_value("exact")  # the default: the first mode
    assert select.locator("option[value=fast]").get_attribute("title") == FLUX_LIKE_MODES[1]["detail"]
    hud = page.locator("[data-testid=mode-label]")
    expect(hud).to_have_text("Exact")
    expect(hud).not_to_have_attribute("data-approximate", "")
    wait_until(page, lambda: bool(params), 10, "params on ready")
    assert params[-1]["mode"] == "exact"

    select.select_option("fast")
    wait_until(page, lambda: params[-1]["mode"] == "fast", 10, "params with the new mode")
    expect(hud).to_have_text("Fast · approx.")
    expect(hud).to_have_attribute("data-approximate", "")
    expect(page.locator("#mode-help")).to_have_text(FLUX_LIKE_MODES[1]["detail"])
    save_screenshot(page, "studio-quality-modes")
    # The rest of the params went along unchanged, on the same socket: no reconnect.
    assert params[-1]["prompt"] == params[0]["prompt"]
    assert len(connections) == 1
    expect(page.locator("[data-testid=status]")).to_have_attribute("data-state", "streaming")


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
