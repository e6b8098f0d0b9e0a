"""Style images: decoding and limits (inference/style_image.py), and the protocol over the real `/ws` with the
preview engine: a session sets and clears its own style image, bad ones are refused and the stream goes on."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from inference.engines.base import FrameJob
from inference.engines.preview import PreviewEngine
from inference.protocol import (
    FRAME_HEADER,
    MAX_STYLE_IMAGE_BYTES,
    MAX_STYLE_IMAGE_SIDE,
    STYLE_IMAGE_SIZE,
    ErrorCode,
    ProtocolError,
    StyleImageState,
    pack_style_image,
)
from inference.style_image import StyleImage, decode_style_image
from tests.inference.helpers import (
    StreamClient,
    decode,
    mean_abs_diff,
    new_ticket,
    running_worker,
    webcam_jpeg,
)


def _picture(width: int, height: int, colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    """A picture with a strong colour cast and some structure."""
    y, x = np.mgrid[0:height, 0:width]
    pattern = ((x // 16 + y // 16) % 2 * 60).astype(np.int16)
    array = np.clip(np.array(colour, dtype=np.int16) + pattern[..., None] - 30, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares ``width`` x ``height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ---- decoding and limits ----


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_jpeg_png_and_webp_pictures_of_any_shape_become_a_square_style_image(fmt: str) -> None:
    style = decode_style_image(_picture(900, 300, (200, 40, 40), fmt))
    assert style.pixels.shape == (STYLE_IMAGE_SIZE, STYLE_IMAGE_SIZE, 3)
    assert style.source_format == fmt
    assert style.source_size == (900, 300)
    red, green, blue = style.pixels.reshape(-1, 3).mean(axis=0)
    assert red > 150  # the picture's colours, not a placeholder
    assert max(green, blue) < 90
    assert not style.pixels.flags.writeable


def test_the_same_bytes_decoded_twice_are_two_style_images() -> None:
    data = _picture(64, 64, (10, 200, 10))
    first, second = decode_style_image(data), decode_style_image(data)
    assert np.array_equal(first.pixels, second.pixels)
    assert first != second  # identity: one session's image is never another's engine cache entry
    assert len({first, second}) == 2


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", ErrorCode.BAD_STYLE_IMAGE),
        (b"this is a text file, not a picture\n" * 10, ErrorCode.BAD_STYLE_IMAGE),
        (_picture(64, 64, (1, 2, 3), "GIF"), ErrorCode.BAD_STYLE_IMAGE),  # not one of the accepted formats
        (_picture(256, 256, (9, 9, 9))[:200], ErrorCode.BAD_STYLE_IMAGE),  # truncated
        (_png_declaring(MAX_STYLE_IMAGE_SIDE + 1, 16), ErrorCode.STYLE_IMAGE_TOO_LARGE),
        (_png_declaring(60_000, 60_000), ErrorCode.STYLE_IMAGE_TOO_LARGE),  # 3.6 gigapixels declared
        (b"\x89PNG" + b"\x00" * MAX_STYLE_IMAGE_BYTES, ErrorCode.STYLE_IMAGE_TOO_LARGE),
    ],
    ids=["empty", "text", "gif", "truncated", "too-wide", "bomb", "too-many-bytes"],
)
def test_a_bad_style_image_is_refused_with_its_code(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_style_image(data)
    assert refused.value.code == code
    assert "style image" in refused.value.message


# ---- the protocol, over a real socket ----


class RecordingPreview:
    """The preview engine, recording the style image each job carried."""

    name = "preview"
    model = "Preview filters (not AI)"
    preview = True
    max_batch = 4

    def __init__(self) -> None:
        self.engine = PreviewEngine()
        self.modes = self.engine.modes
        self.styles: dict[int, StyleImage | None] = {}  # frame id -> its job's style image
        self.batches: list[list[int]] = []
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        self.engine.warm_up()

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        with self._lock:
            self.styles.update((job.frame_id, job.style) for job in jobs)
            self.batches.append([job.frame_id for job in jobs])
        return self.engine.render(jobs)


def test_a_style_image_restyles_the_sessions_own_frames_until_cleared() -> None:
    engine = RecordingPreview()
    jpeg = webcam_jpeg()
    with (
        running_worker(engine_factory=lambda: engine) as running,
        StreamClient.connect(running.ws_url) as styled,
        StreamClient.connect(running.ws_url) as plain,
    ):
        styled.start(new_ticket(user_id="alice"))
        plain.start(new_ticket(user_id="bob"))
        styled.send_frame(1, jpeg)
        before = styled.frame(1).jpeg

        styled.connection.send(pack_style_image(_picture(800, 600, (30, 60, 220))))
        state = styled.receive_until(lambda message: isinstance(message, StyleImageState))
        assert state == StyleImageState(active=True, width=800, height=600)
        # Frames of both sessions, rendered by the one render loop (often in one batch).
        for frame_id in range(2, 5):
            styled.send_frame(frame_id, jpeg)
            plain.send_frame(100 + frame_id, jpeg)
            during = styled.frame(frame_id).jpeg
            plain.frame(100 + frame_id)
        assert all(engine.styles[frame_id] is not None for frame_id in range(2, 5))
        assert all(engine.styles[100 + frame_id] is None for frame_id in range(2, 5))
        # Recoloured after the picture: bluer than the prompt-only frame, visibly.
        assert decode(during)[..., 2].mean() > decode(before)[..., 2].mean() + 20
        assert mean_abs_diff(before, during) > 10

        styled.send_json('{"type": "clear_style"}')
        assert styled.receive_until(lambda message: isinstance(message, StyleImageState)).active is False
        styled.send_frame(10, jpeg)
        after = styled.frame(10).jpeg
        assert engine.styles[10] is None
        assert mean_abs_diff(before, after) < 1  # the prompt-only look again


def test_a_bad_style_image_is_refused_and_the_stream_and_the_old_style_go_on() -> None:
    engine = RecordingPreview()
    jpeg = webcam_jpeg()
    with (
        running_worker(engine_factory=lambda: engine) as running,
        StreamClient.connect(running.ws_url) as client,
    ):
        client.start(new_ticket())
        client.connection.send(pack_style_image(_picture(64, 64, (220, 30, 30), "JPEG")))
        client.receive_until(lambda message: isinstance(message, StyleImageState))
        client.send_frame(1, jpeg)
        client.frame(1)
        kept = engine.styles[1]
        assert kept is not None

        client.connection.send(pack_style_image(b"%PDF-1.7 not a picture"))
        error = client.error()
        assert error.code == ErrorCode.BAD_STYLE_IMAGE
        assert error.frame is None
        client.connection.send(pack_style_image(_png_declaring(20_000, 20_000)))
        assert client.error().code == ErrorCode.STYLE_IMAGE_TOO_LARGE
        # An unknown binary kind is refused too, naming the frame id it carried.
        client.connection.send(FRAME_HEADER.pack(7, 9, 0) + jpeg)
        unknown = client.error()
        assert (unknown.code, unknown.frame) == (ErrorCode.BAD_BINARY_KIND, 7)

        client.send_frame(2, jpeg)
        client.frame(2)
        assert engine.styles[2] is kept  # the refused ones changed nothing
        assert len(client.messages(StyleImageState)) == 1
