"""The studio's style image in headless Chromium with a fake webcam, against `python -m app` in sandbox mode
(the preview engine, which recolours its output with the style image's palette)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from inference.style_image import decode_style_image
from tests.conftest import AppProcess, save_screenshot
from tests.studio.wire import difference, output_colour, start_streaming, wait_until

pytestmark = pytest.mark.browser


def _style_png() -> bytes:
    """A 1200x800 picture in saturated greens and blues: far from any preset's palette."""
    y, x = np.mgrid[0:800, 0:1200]
    array = np.zeros((800, 1200, 3), dtype=np.uint8)
    array[..., 1] = 150 + (x // 40 % 2) * 80
    array[..., 2] = 90 + (y // 40 % 2) * 60
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_style_image_restyles_the_stream_live_and_remove_brings_the_prompt_back(
    start_app: Callable[..., AppProcess], page: Any
) -> None:
    app = start_app()
    wire = start_streaming(page, app, "stylist@example.com")
    wait_until(page, lambda: wire.frames() >= 8, 60, "styled frames in the default style")

    def settle(what: str) -> list[float]:
        seen = wire.frames()
        wait_until(page, lambda: wire.frames() >= seen + 6, 30, what)
        return output_colour(page)

    prompt_only = settle("frames in the prompt's style")
    prompt_only_later = settle("more frames in the prompt's style")
    motion = max(difference(prompt_only, prompt_only_later), 2.0)

    page.set_input_files(
        "[data-testid=style-image-input]",
        {"name": "lagoon.png", "mimeType": "image/png", "buffer": _style_png()},
    )
    expect(page.locator("[data-testid=style-image-thumb]")).to_be_visible()
    wait_until(page, lambda: bool(wire.messages("style_image")), 15, "the worker's style_image answer")
    styled = settle("frames after the style image")
    save_screenshot(page, "studio-style-image")
    # The browser sent a small square it scaled itself, which the worker accepted.
    sent = decode_style_image(wire.style_images[-1])
    assert sent.source_size == (512, 512)
    assert wire.messages("style_image")[-1]["active"] is True
    # The picture took the style image's greens and blues, far beyond the camera's own motion.
    assert difference(prompt_only, styled) > 3 * motion
    red, green, blue = styled
    assert green > red + 20
    assert blue > red

    page.click("[data-testid=style-image-remove]")
    expect(page.locator("[data-testid=style-image-thumb]")).to_be_hidden()
    wait_until(page, lambda: any(m["active"] is False for m in wire.messages("style_image")), 15, "cleared")
    back = settle("frames after removing the style image")
    assert difference(prompt_only, back) < difference(styled, back) / 3

    # A file that is not a picture: a clear message in the page, and the stream goes on, unstyled.
    page.set_input_files(
        "[data-testid=style-image-input]",
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture\n"},
    )
    message = page.locator("[data-testid=style-image-message]")
    expect(message).to_contain_text("notes.txt")
    expect(message).to_contain_text("not a JPEG, PNG or WebP")
    expect(page.locator("[data-testid=style-image-thumb]")).to_be_hidden()
    still = settle("frames after the refused file")
    assert difference(prompt_only, still) < difference(styled, still) / 3
    assert len(wire.style_images) == 1
    assert len(wire.sockets) == 1  # all of it live, on one socket
