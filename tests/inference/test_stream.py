"""The stream protocol through a real worker on a real socket, as the studio's browser would use it."""

from __future__ import annotations

import io
import time

import httpx
from PIL import Image

from inference.engines.preview import PreviewEngine
from inference.protocol import MAX_FRAME_JPEG_BYTES, Ack, Error, ErrorCode, Ready, Usage, Warming
from tests.inference.helpers import (
    OutputFrame,
    StreamClient,
    mean_abs_diff,
    new_ticket,
    running_worker,
    wait_for,
    webcam_jpeg,
    worker_config,
)


def test_round_trip_returns_a_styled_512_frame_tagged_with_the_input_id() -> None:
    jpeg = webcam_jpeg()
    with running_worker() as running, StreamClient.connect(running.ws_url) as client:
        ready = client.start(new_ticket(allowance_seconds=120))
        assert ready == Ready(
            engine="preview",
            model=ready.model,
            worker_id="test-worker",
            preview=True,
            modes=list(PreviewEngine.modes),
            mode="preview",
            pace=True,  # one frame per engine call (MAX_BATCH 1, the default): clients should pace
        )
        assert "preview" in ready.model.lower()
        usage = client.receive()
        assert usage == Usage(seconds_used=0, seconds_remaining=120)

        client.send_json('{"type": "params", "prompt": "pixel art, 8-bit", "steps": 3, "seed": 42}')
        client.send_frame(7, jpeg)
        # The frame is acknowledged as soon as it is waiting for the engine, before its output.
        assert client.receive() == Ack(frame=7)
        output = client.frame()
        assert client.received[-1] is output, "nothing but the ack came between the frame and its output"

        assert output.frame_id == 7
        assert output.render_ms >= 0
        picture = Image.open(io.BytesIO(output.jpeg))
        assert picture.format == "JPEG"
        assert picture.size == (512, 512)
        assert output.jpeg == PreviewEngine().render_one(jpeg, "pixel art, 8-bit")
        # The first styled frame opens the first billable second, and the client is told.
        assert client.receive() == Usage(seconds_used=1, seconds_remaining=119)


def test_clients_are_told_warming_until_the_engine_is_ready_and_early_frames_are_kept() -> None:
    config = worker_config(preview_warmup_seconds=1.0)
    with running_worker(config, wait_ready=False) as running, StreamClient.connect(running.ws_url) as client:
        assert httpx.get(f"{running.url}/health").json()["status"] == "warming"
        assert httpx.get(f"{running.url}/health").status_code == 503
        client.send_hello(new_ticket())
        assert client.receive() == Warming()
        client.send_frame(1, webcam_jpeg())  # sent while warming: rendered once ready, not lost
        assert client.receive() == Ack(frame=1)  # it is waiting for the engine

        assert isinstance(client.receive(timeout=10), Ready)
        assert client.frame(1).frame_id == 1
        assert httpx.get(f"{running.url}/health").status_code == 200


def test_two_concurrent_sessions_each_get_their_own_prompt() -> None:
    jpeg = webcam_jpeg()
    with (
        running_worker() as running,
        StreamClient.connect(running.ws_url) as pixel,
        StreamClient.connect(running.ws_url) as neon,
    ):
        pixel.start(new_ticket(user_id="alice"))
        neon.start(new_ticket(user_id="bob"))
        pixel.send_json('{"type": "params", "prompt": "pixel art"}')
        neon.send_json('{"type": "params", "prompt": "neon cyberpunk city"}')
        for frame_id in range(1, 6):
            pixel.send_frame(frame_id, jpeg)
            neon.send_frame(1000 + frame_id, jpeg)
            pixel_out = pixel.frame(frame_id)
            neon_out = neon.frame(1000 + frame_id)

        preview = PreviewEngine()
        assert pixel_out.jpeg == preview.render_one(jpeg, "pixel art")
        assert neon_out.jpeg == preview.render_one(jpeg, "neon cyberpunk city")
        assert mean_abs_diff(pixel_out.jpeg, neon_out.jpeg) > 20
        # Nobody received the other's frames.
        assert all(f.frame_id < 1000 for f in pixel.messages(OutputFrame))
        assert all(f.frame_id >= 1000 for f in neon.messages(OutputFrame))


def test_a_flood_of_frames_renders_only_the_latest_never_a_backlog() -> None:
    variants = [webcam_jpeg(320, 240, shift=i) for i in range(7)]
    frames = [variants[i % 7] for i in range(200)]
    config = worker_config(preview_delay_seconds=0.1)  # a slow engine: ~10 renders per second at most
    with running_worker(config) as running, StreamClient.connect(running.ws_url) as client:
        client.start(new_ticket())
        started = time.monotonic()
        for frame_id, jpeg in enumerate(frames, start=1):
            client.send_frame(frame_id, jpeg)
        last = client.frame(200, timeout=10)  # the newest frame is always rendered
        elapsed = time.monotonic() - started

        rendered = [message.frame_id for message in client.messages(OutputFrame)]
        assert last.frame_id == 200
        assert rendered == sorted(rendered), "frames come back in order"
        # Renders are bounded by engine time, not by what was sent: far fewer than 200.
        assert len(rendered) <= elapsed / 0.1 + 3
        assert len(rendered) < 50
        # Everything else was replaced while waiting, and nothing is left queued.
        wait_for(lambda: running.metric("stylecast_worker_frames_in_total") == 200)
        dropped = running.metric("stylecast_worker_frames_dropped_total", stage="input")
        assert dropped >= 200 - len(rendered) - 1
        assert running.worker.scheduler.pending_count == 0
        # No further frames trickle in once the last one has been shown.
        time.sleep(0.3)
        try:
            extra = client.receive(timeout=0.2)
        except TimeoutError:
            extra = None
        assert not isinstance(extra, OutputFrame)
        # Acks (this client ignored the flow control, so some may be dropped) name sent frames, in order.
        acked = [ack.frame for ack in client.messages(Ack)]
        assert acked == sorted(set(acked))
        assert set(acked) <= set(range(1, 201))


def test_malformed_input_is_answered_with_an_error_and_the_session_goes_on() -> None:
    jpeg = webcam_jpeg()
    oversized = jpeg + b"\0" * (MAX_FRAME_JPEG_BYTES + 1 - len(jpeg))
    # (what the client sends, the error code, the frame id the error names: a rejected frame gets no ack and
    # no output, so the error is how the client learns it is off the wire)
    cases = [
        (lambda c: c.send_json("{not json"), ErrorCode.BAD_JSON, None),
        (lambda c: c.send_json("[1, 2]"), ErrorCode.BAD_JSON, None),
        (lambda c: c.send_json('{"type": "dance"}'), ErrorCode.UNKNOWN_TYPE, None),
        (lambda c: c.send_json('{"type": "params", "steps": 9}'), ErrorCode.BAD_PARAMS, None),
        (lambda c: c.send_json('{"type": "params", "seed": -1}'), ErrorCode.BAD_PARAMS, None),
        (
            lambda c: c.send_json('{"type": "params", "prompt": "' + "x" * 501 + '"}'),
            ErrorCode.BAD_PARAMS,
            None,
        ),
        (
            lambda c: c.send_json('{"type": "params", "prompt": "neon", "mode": "turbo"}'),
            ErrorCode.BAD_PARAMS,
            None,
        ),
        (lambda c: c.send_json('{"type": "params", "mode": "Not A Mode!"}'), ErrorCode.BAD_PARAMS, None),
        (lambda c: c.send_json('{"type": "hello", "ticket": "again"}'), ErrorCode.UNEXPECTED_HELLO, None),
        (lambda c: c.connection.send(b"\x01\x02"), ErrorCode.BAD_FRAME, None),
        (lambda c: c.send_frame(3, b"\x89PNG\r\n\x1a\n" + b"\0" * 100), ErrorCode.NOT_JPEG, 3),
        (lambda c: c.send_frame(4, jpeg[: len(jpeg) // 50]), ErrorCode.NOT_JPEG, 4),
        (lambda c: c.send_frame(5, oversized), ErrorCode.FRAME_TOO_LARGE, 5),
    ]
    with running_worker() as running, StreamClient.connect(running.ws_url) as client:
        client.start(new_ticket())
        client.send_json('{"type": "params", "prompt": "anime"}')
        for send, code, frame in cases:
            send(client)
            error = client.error()
            assert error.code == code, error
            assert error.frame == frame, error
            assert error.message
        # A rejected params message changed nothing: the prompt is still "anime" with default steps, and
        # the mode is still the default.
        client.send_frame(99, jpeg)
        assert client.frame(99).jpeg == PreviewEngine().render_one(jpeg, "anime")
        assert not [m for m in client.received if isinstance(m, Error) and m.code == ErrorCode.RENDER_FAILED]
        assert running.metric("stylecast_worker_frame_errors_total", code="not_jpeg") == 2
        # Only the valid frame was acknowledged.
        assert client.messages(Ack) == [Ack(frame=99)]


def test_frames_of_any_size_and_aspect_are_accepted() -> None:
    with running_worker() as running, StreamClient.connect(running.ws_url) as client:
        client.start(new_ticket())
        for frame_id, (width, height) in enumerate([(1280, 720), (480, 640), (64, 48), (512, 512)], start=1):
            client.send_frame(frame_id, webcam_jpeg(width, height))
            output = client.frame(frame_id)
            assert Image.open(io.BytesIO(output.jpeg)).size == (512, 512)
