"""What the studio's browser tests share: a log of what crossed the studio's WebSockets as Chromium saw
it, waiting inside Playwright, reading the output canvas, and starting a stream."""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inference.protocol import FRAME_HEADER_BYTES, BinaryKind, binary_kind, unpack_frame
from tests.conftest import AppProcess, sign_in


@dataclass
class WireLog:
    """What crossed the studio's WebSockets, as Chromium saw it. Binary frames are parsed with the
    protocol's own parser (inference/protocol.py)."""

    sockets: list[str] = field(default_factory=list)
    sent: dict[int, float] = field(default_factory=dict)  # frame id -> monotonic time sent
    received: list[tuple[int, float]] = field(default_factory=list)  # (frame id, time) of output frames
    render_ms: list[int] = field(default_factory=list)  # the worker's render time of each output frame
    waited_ms: list[int] = field(default_factory=list)  # and how long its input waited for the engine
    acked: set[int] = field(default_factory=set)  # frame ids acknowledged, or refused with an error
    max_unacked: int = 0
    text_in: list[str] = field(default_factory=list)
    text_out: list[str] = field(default_factory=list)
    # The JPEG of every frame sent and received, by frame id, for tests that compare pixels.
    jpeg_out: dict[int, bytes] = field(default_factory=dict)
    jpeg_in: dict[int, bytes] = field(default_factory=dict)
    # For each text message sent, the highest frame id sent before it: later frames follow it on the wire.
    text_out_after_frame: list[int] = field(default_factory=list)
    style_images: list[bytes] = field(default_factory=list)  # the bytes of each style image sent
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
                self.text_out_after_frame.append(max(self.sent, default=0))
            elif len(payload) > FRAME_HEADER_BYTES and binary_kind(payload) == BinaryKind.STYLE_IMAGE:
                self.style_images.append(payload[FRAME_HEADER_BYTES:])
            elif len(payload) > FRAME_HEADER_BYTES:
                frame = unpack_frame(payload)
                self.sent[frame.frame_id] = time.monotonic()
                self.jpeg_out[frame.frame_id] = frame.jpeg
                self.max_unacked = max(self.max_unacked, self._unacked())

    def _received(self, payload: str | bytes) -> None:
        with self.lock:
            if isinstance(payload, bytes):
                frame = unpack_frame(payload)
                self.received.append((frame.frame_id, time.monotonic()))
                self.render_ms.append(frame.render_ms)
                self.waited_ms.append(frame.waited_ms)
                self.jpeg_in[frame.frame_id] = frame.jpeg
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

    def last_params(self) -> tuple[dict[str, Any], int] | None:
        """The latest `params` the studio sent, and the highest frame id it had sent before it."""
        with self.lock:
            sent = list(zip(self.text_out, self.text_out_after_frame, strict=True))
        for text, after in reversed(sent):
            message = json.loads(text)
            if message.get("type") == "params":
                return message, after
        return None

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


def begin_streaming(page: Any, app: AppProcess, email: str) -> None:
    """Sign in as `email`, press Start and wait until the studio streams."""
    sign_in(page, app.url, email)
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=status][data-state=streaming]", timeout=30_000)


def start_streaming(page: Any, app: AppProcess, email: str) -> WireLog:
    wire = WireLog()
    wire.attach(page)
    begin_streaming(page, app, email)
    return wire


Relayed = str | bytes


def _unchanged(message: Relayed) -> Relayed:
    return message


def relay_sockets(
    page: Any,
    to_worker: Callable[[Relayed], Relayed] = _unchanged,
    to_page: Callable[[Relayed], Relayed] = _unchanged,
) -> list[str]:
    """Relay the page's WebSockets through the test: each message the page sends goes on as `to_worker`
    returns it, and each the worker sends as `to_page` returns it (both run on Playwright's thread).
    Returns the list of the sockets' URLs, which fills as they open."""
    urls: list[str] = []

    def relay(route: Any) -> None:
        urls.append(route.url)
        server = route.connect_to_server()
        route.on_message(lambda message: server.send(to_worker(message)))
        server.on_message(lambda message: route.send(to_page(message)))

    page.route_web_socket(re.compile(r"^wss?://"), relay)
    return urls
