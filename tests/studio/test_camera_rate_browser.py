"""The studio sends no faster than its camera, up to the protocol's 60 frames a second: a 20 FPS camera
gets no repeated frames sent, and a 60 FPS camera gets a fast engine more than the 30 a webcam usually
gives. Headless Chromium's fake webcam runs at the rate each test sets."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from inference.protocol import MAX_CLIENT_FPS
from tests.conftest import AppProcess
from tests.studio.wire import start_streaming, wait_until

pytestmark = pytest.mark.browser

WINDOW_SECONDS = 3.0


def _sent_per_second(wire: Any, page: Any) -> float:
    """Frames the studio sent per second over WINDOW_SECONDS, once it streams steadily."""
    wait_until(page, lambda: wire.frames() >= 5, 30, "the first frames")
    start = time.monotonic()
    page.wait_for_timeout(WINDOW_SECONDS * 1000)
    end = time.monotonic()
    return sum(1 for at in wire.sent.values() if start <= at < end) / (end - start)


@pytest.mark.parametrize("camera_fps", [20, MAX_CLIENT_FPS])
def test_the_studio_sends_frames_as_fast_as_its_camera_makes_them(
    start_app: Callable[..., AppProcess], page: Any, camera_fps: int
) -> None:
    # A batching worker asks for camera rate (no pacing); its engine outruns any camera.
    app = start_app(PREVIEW_DELAY_MS="5", MAX_BATCH="4")
    wire = start_streaming(page, app, f"camera-{camera_fps}@example.com")
    assert wire.messages("ready")[0]["pace"] is False
    rate = _sent_per_second(wire, page)
    # Never more frames than the camera made (a repeated frame would cost the GPU for nothing)...
    assert rate <= camera_fps * 1.05, rate
    # ...and all of them from a slow camera; from a camera faster than the usual 30, well over 30: a capture
    # whose encoding outlasts a display frame starts the next one on its timer, not a display frame later
    # (which held a 60 FPS camera to 30 a second). Headless Chromium on the 2-core machine: 50.6-56.7 a
    # second, 55.9 with both cores busy.
    assert rate >= (0.75 * camera_fps if camera_fps <= 30 else 40), rate
    assert wire.max_unacked <= 2
