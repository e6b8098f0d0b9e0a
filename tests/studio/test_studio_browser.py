"""The studio in headless Chromium with a fake webcam, against `python -m app` in sandbox mode."""

from __future__ import annotations

import io
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import pytest
from PIL import Image
from playwright.sync_api import expect

from inference.engines.preview import PreviewEngine
from inference.protocol import pack_frame, unpack_frame
from tests.conftest import AppProcess, save_screenshot, sign_in
from tests.inference.helpers import mean_abs_diff
from tests.studio.wire import (
    WireLog,
    begin_streaming,
    difference,
    output_colour,
    relay_sockets,
    start_streaming,
    wait_until,
)

pytestmark = pytest.mark.browser


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


def test_a_typed_prompt_restyles_the_stream_live(start_app: Callable[..., AppProcess], page: Any) -> None:
    """Typing, not a preset: what the person types is what the worker renders, on the same socket.

    The preview engine picks a look by keywords and otherwise paints a duotone in the colour words of the
    prompt, so two typed prompts naming different colours give different pictures. Each output is also
    compared with what the engine renders for its input frame and the typed prompt: a studio that sent
    anything else (the preset's prompt, a stale or truncated one) fails that comparison."""
    app = start_app()
    wire = start_streaming(page, app, "typist@example.com")
    wait_until(page, lambda: wire.frames() >= 8, 60, "styled frames in the default style")
    prompt_box = page.locator("[data-testid=prompt]")
    default_prompt = prompt_box.input_value()
    engine = PreviewEngine()

    def type_prompt(typed: str, previous: str) -> list[float]:
        before = output_colour(page)
        prompt_box.click()
        prompt_box.press("ControlOrMeta+a")
        prompt_box.press_sequentially(typed, delay=5)

        def typed_prompt_sent() -> bool:
            last = wire.last_params()
            return last is not None and last[0]["prompt"] == typed

        wait_until(page, typed_prompt_sent, 10, f"params with the prompt {typed!r}")
        last = wire.last_params()
        assert last is not None
        after = last[1]

        def styled_after_it() -> list[int]:
            with wire.lock:
                return [frame_id for frame_id in wire.jpeg_in if frame_id > after and frame_id in wire.sent]

        wait_until(page, lambda: len(styled_after_it()) >= 6, 30, f"frames styled as {typed!r}")
        # Outputs are drawn on the next display frame: give the canvas a moment to show the latest.
        page.wait_for_timeout(200)
        shown = output_colour(page)
        assert difference(before, shown) > 8, (typed, before, shown)
        # No preset is lit up for a prompt that is none of them.
        expect(page.locator(".preset[aria-pressed=true]")).to_have_count(0)

        for frame_id in styled_after_it()[:3]:
            with wire.lock:
                sent, styled = wire.jpeg_out[frame_id], wire.jpeg_in[frame_id]
            assert mean_abs_diff(styled, engine.render_one(sent, typed)) < 1.5, frame_id
            assert mean_abs_diff(styled, engine.render_one(sent, previous)) > 10, frame_id
        return shown

    teal_and_pink = type_prompt("a screen print in teal and pink", default_prompt)
    red_and_yellow = type_prompt("a gig poster in red and yellow", "a screen print in teal and pink")
    assert difference(teal_and_pink, red_and_yellow) > 8
    save_screenshot(page, "studio-typed-prompt")
    # Typed live: one socket throughout, and the worker refused nothing.
    assert len(wire.sockets) == 1
    assert not wire.messages("error")
    expect(page.locator("[data-testid=status]")).to_have_attribute("data-state", "streaming")


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


def test_a_paced_studio_sends_once_a_round_as_the_worker_says(
    start_app: Callable[..., AppProcess], page: Any
) -> None:
    """The studio's interval is the round in each ack, not the time between outputs. The relay says a
    round of about four of this engine's renders (as with three more sessions streaming), and that each
    frame waited the margin (on time): the studio sends a frame a round, where the time between outputs
    alone (one render and the way there and back) would pace it at one a render."""
    app = start_app(PREVIEW_DELAY_MS="100")
    told_ms = 500
    sent_at: list[float] = []
    lock = threading.Lock()

    def to_worker(message: str | bytes) -> str | bytes:
        if isinstance(message, bytes):
            with lock:
                sent_at.append(time.monotonic())
        return message

    def to_page(message: str | bytes) -> str | bytes:
        if isinstance(message, str) and json.loads(message).get("type") == "ack":
            return json.dumps({**json.loads(message), "round_ms": told_ms})
        if isinstance(message, bytes):  # each frame waited the margin: on time, nothing to correct
            frame = unpack_frame(message)
            return pack_frame(frame.frame_id, frame.jpeg, frame.render_ms, waited_ms=4)
        return message

    relay_sockets(page, to_worker, to_page)
    begin_streaming(page, app, "round@example.com")

    def sent() -> int:
        with lock:
            return len(sent_at)

    wait_until(page, lambda: sent() >= 12, 60, "twelve frames sent")
    page.click("[data-testid=stop]")
    with lock:
        settled = sent_at[5:]  # after the first outputs, sent one at a time
    gaps = [later - earlier for earlier, later in itertools.pairwise(settled)]
    # A frame a round (each moved by a few milliseconds of correction), not one a render (~0.11 s).
    assert 0.8 * told_ms / 1000 <= statistics.median(gaps) <= 1.2 * told_ms / 1000, gaps


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
    params: list[dict[str, Any]] = []

    def to_worker(message: str | bytes) -> str | bytes:
        if isinstance(message, str) and json.loads(message).get("type") == "params":
            sent = json.loads(message)
            params.append(dict(sent))
            sent.pop("mode", None)
            return json.dumps(sent)
        return message

    def to_page(message: str | bytes) -> str | bytes:
        if isinstance(message, str) and json.loads(message).get("type") == "ready":
            return json.dumps({**json.loads(message), "modes": FLUX_LIKE_MODES, "mode": "exact"})
        return message

    connections = relay_sockets(page, to_worker, to_page)
    begin_streaming(page, app, "quality@example.com")

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
