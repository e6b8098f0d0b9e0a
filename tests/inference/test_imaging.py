from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from inference.imaging import (
    MAX_DIMENSION,
    ImageTooLarge,
    InvalidJpeg,
    JpegInfo,
    decode_square,
    encode_jpeg,
    inspect_jpeg,
)
from tests.inference.helpers import webcam_jpeg


def _with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with other dimensions written into its frame header."""
    sof = jpeg.index(b"\xff\xc0")
    patched = bytearray(jpeg)
    patched[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    patched[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(patched)


def test_inspect_reads_dimensions_of_baseline_and_progressive_jpegs() -> None:
    assert inspect_jpeg(webcam_jpeg(640, 480)) == JpegInfo(width=640, height=480)
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), "teal").save(buffer, "JPEG", progressive=True)
    assert inspect_jpeg(buffer.getvalue()) == JpegInfo(width=300, height=200)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        b"GIF89a" + b"\0" * 64,
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",  # header only, no frame, no scan
    ],
    ids=["empty", "soi-only", "png", "gif", "truncated"],
)
def test_inspect_refuses_what_is_not_a_jpeg(data: bytes) -> None:
    with pytest.raises(InvalidJpeg):
        inspect_jpeg(data)


def test_inspect_refuses_a_truncated_jpeg() -> None:
    jpeg = webcam_jpeg()
    with pytest.raises(InvalidJpeg):
        inspect_jpeg(jpeg[:200])


def test_inspect_refuses_decompression_bombs_without_decoding() -> None:
    bomb = _with_declared_size(webcam_jpeg(64, 48), 60_000, 60_000)
    with pytest.raises(ImageTooLarge):
        inspect_jpeg(bomb)
    inspect_jpeg(_with_declared_size(webcam_jpeg(64, 48), MAX_DIMENSION, 48))  # the limit itself is fine


@given(st.binary(max_size=512))
def test_inspect_never_fails_in_an_undocumented_way(data: bytes) -> None:
    with contextlib.suppress(InvalidJpeg, ImageTooLarge):
        inspect_jpeg(b"\xff\xd8\xff" + data)


@pytest.mark.parametrize("size", [(1920, 1080), (480, 640), (512, 512), (100, 60)])
def test_decode_square_center_crops_and_resizes(size: tuple[int, int]) -> None:
    image = decode_square(webcam_jpeg(*size))
    assert image.size == (512, 512)
    assert image.mode == "RGB"


def test_decode_square_keeps_the_center() -> None:
    # Left third red, middle third green, right third blue: the square crop of a 3:1 picture is green.
    picture = Image.new("RGB", (900, 300), "red")
    picture.paste((0, 200, 0), (300, 0, 600, 300))
    picture.paste((0, 0, 255), (600, 0, 900, 300))
    square = decode_square(encode_jpeg(picture, quality=95))
    red, green, blue = square.getpixel((256, 256))
    assert green > 150
    assert max(red, blue) < 60
    red, green, blue = square.getpixel((5, 256))
    assert green > 150


def test_encode_jpeg_round_trips() -> None:
    image = decode_square(webcam_jpeg())
    encoded = encode_jpeg(image)
    assert encoded[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(encoded)).size == (512, 512)
