"""The binary frame header as the studio's own code writes it in Chromium, read back with the protocol's
parser (inference/protocol.py).

The worker echoes each frame id, so a studio writing the id in the wrong byte order would still match its
own outputs and stream normally against it: only bytes taken off the wire and parsed by the protocol's
definition show the order. The socket is relayed through the test, which keeps every message the page
sends, byte for byte, before passing it on to the real worker."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from inference.protocol import FRAME_HEADER, FRAME_HEADER_BYTES, unpack_frame
from tests.conftest import AppProcess
from tests.studio.wire import begin_streaming, relay_sockets, wait_until

pytestmark = pytest.mark.browser


def test_the_studio_writes_frame_headers_as_the_protocol_defines_them(
    start_app: Callable[..., AppProcess], page: Any
) -> None:
    app = start_app()
    from_page: list[bytes] = []
    from_worker: list[bytes] = []
    lock = threading.Lock()

    def to_worker(message: str | bytes) -> str | bytes:
        if isinstance(message, bytes):
            with lock:
                from_page.append(message)
        return message

    def to_page(message: str | bytes) -> str | bytes:
        if isinstance(message, bytes):
            with lock:
                from_worker.append(message)
        return message

    relay_sockets(page, to_worker, to_page)
    begin_streaming(page, app, "bytes@example.com")

    def counts() -> tuple[int, int]:
        with lock:
            return len(from_page), len(from_worker)

    wait_until(page, lambda: min(counts()) >= 10, 60, "ten frames each way")
    page.click("[data-testid=stop]")
    with lock:
        sent, outputs = list(from_page), list(from_worker)

    frames = [unpack_frame(message) for message in sent]
    ids = [frame.frame_id for frame in frames]
    # Ids count up from 1 in the protocol's byte order (little-endian: 01 00 00 00 is 1; read the other
    # way round it would be 16777216).
    assert ids == list(range(1, len(ids) + 1)), ids[:5]
    assert sent[0][:4] == (1).to_bytes(4, "little")
    for frame, message in zip(frames, sent, strict=True):
        # An input frame's render and wait fields are zeros, and the JPEG starts right after the header.
        assert (frame.render_ms, frame.waited_ms) == (0, 0)
        assert message[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + 2] == b"\xff\xd8"
        assert FRAME_HEADER.unpack(message[:FRAME_HEADER_BYTES]) == (frame.frame_id, 0, 0)
    with Image.open(io.BytesIO(frames[0].jpeg)) as image:
        assert (image.format, image.size) == ("JPEG", (512, 512))

    # And the studio reads the worker's headers the same way: the outputs carry ids it sent, and it
    # matched them to its own send times, which is what the latency readout shows.
    assert {unpack_frame(message).frame_id for message in outputs} <= set(ids)
    latency = page.inner_text("[data-testid=latency]")
    assert latency.isdigit(), latency
