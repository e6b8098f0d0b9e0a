"""A session's style image: the picture a user drops into the studio to be restyled after it.

The client sends the image's file bytes (JPEG, PNG or WebP) in a binary message of its own kind
(``protocol.BinaryKind.STYLE_IMAGE``); the worker decodes and checks it here, once, off the event loop,
and keeps the result in the session. Every job of that session then carries the same ``StyleImage``
object, which is also the key under which an engine keeps what it computed from it (the flux2 engine's
VAE latents): identity, not contents, so two sessions never share one and an engine's entry goes when the
session lets go of its image.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inference.protocol import (
    MAX_STYLE_IMAGE_BYTES,
    MAX_STYLE_IMAGE_SIDE,
    STYLE_IMAGE_FORMATS,
    STYLE_IMAGE_SIZE,
    ErrorCode,
    ProtocolError,
)


@dataclass(frozen=True, eq=False, slots=True, weakref_slot=True)
class StyleImage:
    """A decoded, checked style image, center-cropped to a square and resized to STYLE_IMAGE_SIZE².

    Compared and hashed by identity: it is one session's image, and the key of what engines derive from
    it."""

    pixels: np.ndarray = field(repr=False)  # (STYLE_IMAGE_SIZE, STYLE_IMAGE_SIZE, 3) uint8 RGB, read-only
    source_format: str  # "JPEG", "PNG", "WEBP"
    source_size: tuple[int, int]  # (width, height) of the picture as sent

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels)


def style_image_from_pixels(pixels: np.ndarray, source_format: str = "PNG") -> StyleImage:
    """A StyleImage of RGB pixels already at STYLE_IMAGE_SIZE² (tests, the bench)."""
    array = np.ascontiguousarray(pixels, dtype=np.uint8)
    if array.shape != (STYLE_IMAGE_SIZE, STYLE_IMAGE_SIZE, 3):
        side = STYLE_IMAGE_SIZE
        raise ValueError(f"style pixels must be ({side}, {side}, 3), got {array.shape}")
    array.setflags(write=False)
    return StyleImage(array, source_format, (STYLE_IMAGE_SIZE, STYLE_IMAGE_SIZE))


def decode_style_image(data: bytes) -> StyleImage:
    """Decode and check a style image's file bytes. Blocking (tens of milliseconds for a large picture):
    call it in a thread. Raises ProtocolError with STYLE_IMAGE_TOO_LARGE (over MAX_STYLE_IMAGE_BYTES, or a
    side over MAX_STYLE_IMAGE_SIDE) or BAD_STYLE_IMAGE (empty, not a JPEG/PNG/WebP, or corrupt)."""
    if len(data) > MAX_STYLE_IMAGE_BYTES:
        raise ProtocolError(
            ErrorCode.STYLE_IMAGE_TOO_LARGE,
            f"the style image is {len(data)} bytes; the limit is {MAX_STYLE_IMAGE_BYTES} (resize it first)",
        )
    if not data:
        raise ProtocolError(ErrorCode.BAD_STYLE_IMAGE, "the style image message carries no image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(STYLE_IMAGE_FORMATS))
            with image:
                width, height = image.size
                if max(width, height) > MAX_STYLE_IMAGE_SIDE:
                    raise ProtocolError(
                        ErrorCode.STYLE_IMAGE_TOO_LARGE,
                        f"the style image is {width}x{height}; at most {MAX_STYLE_IMAGE_SIDE} pixels a side",
                    )
                if width < 1 or height < 1:
                    raise ProtocolError(ErrorCode.BAD_STYLE_IMAGE, "the style image has no pixels")
                source_format = image.format or "?"
                # An animated WebP or PNG is styled after its first frame.
                image.seek(0)
                rgb = ImageOps.exif_transpose(image).convert("RGB")
    except ProtocolError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProtocolError(
            ErrorCode.STYLE_IMAGE_TOO_LARGE,
            f"the style image declares too many pixels; at most {MAX_STYLE_IMAGE_SIDE} a side ({exc})",
        ) from exc
    except UnidentifiedImageError as exc:
        raise ProtocolError(
            ErrorCode.BAD_STYLE_IMAGE,
            f"the style image is not a JPEG, PNG or WebP picture Stylecast can read ({exc})",
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        message = f"the style image could not be decoded: {exc}"
        raise ProtocolError(ErrorCode.BAD_STYLE_IMAGE, message) from exc
    square = ImageOps.fit(rgb, (STYLE_IMAGE_SIZE, STYLE_IMAGE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(square, dtype=np.uint8).copy()
    pixels.setflags(write=False)
    return StyleImage(pixels, source_format, (width, height))
