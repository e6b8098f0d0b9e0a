"""JPEG helpers for the worker: a cheap validity check for every incoming frame (header only, no decode),
and the decode/crop/encode path of the CPU engines."""

from __future__ import annotations

import io
from typing import Final

import msgspec
from PIL import Image

from inference.protocol import OUTPUT_SIZE

JPEG_QUALITY: Final = 85
# A 1 MiB JPEG can declare 65535x65535 pixels; decoding that would need ~12 GiB. Webcams stay far below.
MAX_DIMENSION: Final = 4096

# Start-of-frame markers carry the image size. C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not.
_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS: Final = 0xDA
# Markers without a length field.
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})


class JpegInfo(msgspec.Struct, frozen=True):
    width: int
    height: int


class InvalidJpeg(ValueError):
    """The bytes are not a JPEG the engines can decode."""


class ImageTooLarge(ValueError):
    """A JPEG whose declared pixel dimensions exceed MAX_DIMENSION."""


def inspect_jpeg(data: bytes) -> JpegInfo:
    """Walk the marker segments up to the first scan: checks the SOI magic, a frame header with sane
    dimensions and that a scan follows. Costs microseconds; never decodes pixels."""
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[2] != 0xFF:
        raise InvalidJpeg("missing JPEG start-of-image marker")
    pos = 2
    info: JpegInfo | None = None
    while pos < size:
        if data[pos] != 0xFF:
            raise InvalidJpeg(f"expected a marker at byte {pos}")
        while pos < size and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= size:
            break
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD9:
            break
        if pos + 2 > size:
            break
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > size:
            raise InvalidJpeg("truncated JPEG segment")
        if marker in _SOF_MARKERS:
            if length < 8:
                raise InvalidJpeg("truncated JPEG frame header")
            height = (data[pos + 3] << 8) | data[pos + 4]
            width = (data[pos + 5] << 8) | data[pos + 6]
            if width == 0 or height == 0:
                raise InvalidJpeg("JPEG declares zero width or height")
            if width > MAX_DIMENSION or height > MAX_DIMENSION:
                raise ImageTooLarge(f"{width}x{height} exceeds {MAX_DIMENSION}x{MAX_DIMENSION} pixels")
            info = JpegInfo(width=width, height=height)
        elif marker == _SOS:
            if info is None:
                raise InvalidJpeg("JPEG scan before any frame header")
            if pos + length >= size:
                raise InvalidJpeg("JPEG has no image data")
            return info
        pos += length
    raise InvalidJpeg("JPEG has no frame header and scan")


def decode_square(jpeg: bytes, size: int = OUTPUT_SIZE) -> Image.Image:
    """Decode to RGB, center-crop to a square and resize to size x size."""
    image = Image.open(io.BytesIO(jpeg))
    # Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding when the source is much larger: far cheaper
    # than decoding full size and resizing afterwards.
    image.draft("RGB", (size, size))
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    box = (left, top, left + side, top + side)
    if side == size:
        return image.crop(box)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
