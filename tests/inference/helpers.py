"""Shared pieces of the worker tests: a real worker on a real socket, a WebSocket client speaking the
protocol, webcam-like JPEGs and a clock the test moves by hand."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
from litestar import Litestar
from PIL import Image, ImageDraw, ImageFilter
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from inference.config import WorkerConfig
from inference.engines.base import Engine
from inference.protocol import (
    Admitted,
    Error,
    Hello,
    Ready,
    Usage,
    Warming,
    decode_server_message,
    encode_message,
    pack_frame,
    unpack_frame,
)
from inference.server import WEBSOCKET_SERVER_OPTIONS, Worker, create_inference_app
from inference.tickets import issue_ticket
from tests.live_server import serve

SECRET = "stylecast-test-stream-secret-0123456789abcdef"


class FakeClock:
    """Unix time that only moves when the test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def webcam_jpeg(width: int = 640, height: int = 480, *, shift: int = 0, quality: int = 85) -> bytes:
    """A deterministic head-and-shoulders scene with gradients, edges and sensor noise."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack(
        [(x / width) * 200 + 30, (y / height) * 160 + 40, ((x + y) / (width + height)) * 120 + 80], axis=-1
    )
    image = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    cx, cy, r = width // 2 + shift, height // 2, min(width, height) // 4
    draw.ellipse((cx - r, cy - r * 1.2, cx + r, cy + r), fill=(224, 182, 150))
    draw.ellipse((cx - r // 2 - 10, cy - r // 3, cx - r // 2 + 14, cy - r // 3 + 20), fill=(40, 30, 30))
    draw.ellipse((cx + r // 2 - 14, cy - r // 3, cx + r // 2 + 10, cy - r // 3 + 20), fill=(40, 30, 30))
    draw.rectangle((cx - r * 1.5, cy + r, cx + r * 1.5, height), fill=(40, 70, 160))
    noise = np.random.default_rng(shift).normal(0, 5, (height, width, 3))
    noisy = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(0.8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def mean_abs_diff(a: bytes, b: bytes) -> float:
    return float(np.abs(decode(a) - decode(b)).mean())


def worker_config(**overrides: object) -> WorkerConfig:
    values: dict[str, object] = {
        "stream_secret": SECRET,
        "worker_id": "test-worker",
        "hello_timeout_seconds": 2.0,
        # These workers render with deliberately slow stand-in engines to test flow control and fairness;
        # admission (tests/inference/test_admission.py) sets its own floor.
        "min_session_fps": 0.5,
    }
    values.update(overrides)
    return WorkerConfig(**values)  # type: ignore[arg-type]


def new_ticket(allowance_seconds: int = 3600, *, user_id: str = "user_1", **options: object) -> str:
    return issue_ticket(
        SECRET,
        user_id=user_id,
        stream_id=f"stream_{uuid.uuid4().hex[:12]}",
        allowance_seconds=allowance_seconds,
        **options,  # type: ignore[arg-type]
    )


@dataclass
class RunningWorker:
    url: str
    ws_url: str
    app: Litestar
    worker: Worker

    def metric(self, name: str, **labels: str) -> float:
        value = self.worker.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


@contextmanager
def running_worker(
    config: WorkerConfig | None = None,
    *,
    clock: Callable[[], float] = time.time,
    engine_factory: Callable[[], Engine] | None = None,
    wait_ready: bool = True,
) -> Iterator[RunningWorker]:
    app = create_inference_app(config or worker_config(), clock=clock, engine_factory=engine_factory)
    with serve(app, **WEBSOCKET_SERVER_OPTIONS) as url:
        running = RunningWorker(
            url=url, ws_url=url.replace("http://", "ws://") + "/ws", app=app, worker=app.state.worker
        )
        if wait_ready:
            wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=20)
        yield running


@dataclass(frozen=True)
class OutputFrame:
    frame_id: int
    render_ms: int
    waited_ms: int
    jpeg: bytes


Message = Warming | Ready | Usage | Error | OutputFrame


@dataclass
class StreamClient:
    """A protocol-speaking client over a real WebSocket; keeps everything it received, in order."""

    connection: ClientConnection
    received: list[Message] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    # The worker's first message, which the connect sequence waits for before it gets a ticket; None when
    # the worker closed instead (close_code says why, e.g. 4503 when it is full).
    admitted: Admitted | None = None

    @classmethod
    @contextmanager
    def connect(cls, ws_url: str) -> Iterator[StreamClient]:
        with connect(ws_url, max_size=4 * 1024 * 1024, open_timeout=10) as connection:
            client = cls(connection)
            try:
                first = decode_server_message(connection.recv(timeout=10))
            except ConnectionClosed as closed:
                if closed.rcvd is not None:
                    client.close_code, client.close_reason = closed.rcvd.code, closed.rcvd.reason
            else:
                assert isinstance(first, Admitted), f"the worker's first message was {first!r}"
                client.admitted = first
            yield client

    def send_hello(self, ticket: str) -> None:
        self.connection.send(encode_message(Hello(ticket=ticket)))

    def send_json(self, text: str) -> None:
        self.connection.send(text)

    def send_frame(self, frame_id: int, jpeg: bytes) -> None:
        self.connection.send(pack_frame(frame_id, jpeg))

    def receive(self, timeout: float = 10.0) -> Message:
        """The next message; raises ConnectionClosed (after recording the close code) when the worker
        closes."""
        try:
            data = self.connection.recv(timeout=timeout)
        except ConnectionClosed as closed:
            if closed.rcvd is not None:
                self.close_code, self.close_reason = closed.rcvd.code, closed.rcvd.reason
            raise
        message: Message
        if isinstance(data, bytes):
            frame_id, render_ms, waited_ms, jpeg = unpack_frame(data)
            message = OutputFrame(frame_id, render_ms, waited_ms, jpeg)
        else:
            message = decode_server_message(data)
        self.received.append(message)
        return message

    def receive_until(self, predicate: Callable[[Message], bool], timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("expected message did not arrive")
            message = self.receive(timeout=remaining)
            if predicate(message):
                return message

    def frame(self, frame_id: int | None = None, timeout: float = 10.0) -> OutputFrame:
        def wanted(message: Message) -> bool:
            return isinstance(message, OutputFrame) and (frame_id is None or message.frame_id == frame_id)

        found = self.receive_until(wanted, timeout)
        assert isinstance(found, OutputFrame)
        return found

    def error(self, timeout: float = 10.0) -> Error:
        found = self.receive_until(lambda message: isinstance(message, Error), timeout)
        assert isinstance(found, Error)
        return found

    def wait_closed(self, timeout: float = 10.0) -> int:
        """Read until the worker closes; returns the close code."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.receive(timeout=max(deadline - time.monotonic(), 0.01))
            except ConnectionClosed:
                assert self.close_code is not None, "closed without a close frame"
                return self.close_code

    def start(self, ticket: str, timeout: float = 10.0) -> Ready:
        """hello, then wait for `ready`."""
        self.send_hello(ticket)
        ready = self.receive_until(lambda message: isinstance(message, Ready), timeout)
        assert isinstance(ready, Ready)
        return ready

    def messages(self, kind: type) -> list:
        return [message for message in self.received if isinstance(message, kind)]
