"""Flow control over the real `/ws`: every valid frame is acked as soon as it waits for the engine and a
client keeps at most two frames unacknowledged; a client paced like the studio (inference.pacing) sends one
frame per turn, timed to arrive just before it: the engine always finds a fresh frame per session when a
batch ends, latency is about one render, and every session gets its fair share."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.loadgen import run_load
from inference.pacing import MAX_MARGIN
from inference.protocol import Ack
from tests.inference.helpers import (
    SECRET,
    OutputFrame,
    StreamClient,
    new_ticket,
    running_worker,
    webcam_jpeg,
    worker_config,
)

RENDER_DELAY_SECONDS = 0.06  # per engine call, on top of the preview filters' own CPU time


def is_ack_of(message: object, frame_id: int) -> bool:
    return isinstance(message, Ack) and message.frame == frame_id


def test_each_valid_frame_is_acked_before_its_output_and_replaced_frames_get_none() -> None:
    jpeg = webcam_jpeg(320, 240)
    with (
        running_worker(worker_config(preview_delay_seconds=0.2)) as running,
        StreamClient.connect(running.ws_url) as client,
    ):
        client.start(new_ticket())
        # Like a camera at 25 fps with at most two frames unacknowledged: the sender never waits for output.
        for frame_id in range(1, 16):
            client.send_frame(frame_id, jpeg)
            client.receive_until(lambda message, frame_id=frame_id: is_ack_of(message, frame_id), timeout=5)
            time.sleep(0.04)
        client.frame(15, timeout=5)  # the last frame is always rendered

    acks = [message.frame for message in client.messages(Ack)]
    assert acks == list(range(1, 16)), "every valid frame is acknowledged, in order"
    outputs = [message.frame_id for message in client.messages(OutputFrame)]
    assert outputs == sorted(outputs)
    # A 200 ms engine renders some of 15 frames sent 40 ms apart; the others were replaced while waiting.
    assert 3 <= len(outputs) < 10
    for frame_id in outputs:  # the ack of a frame always comes before its output
        ack_at = next(index for index, message in enumerate(client.received) if is_ack_of(message, frame_id))
        output_at = next(
            index
            for index, message in enumerate(client.received)
            if isinstance(message, OutputFrame) and message.frame_id == frame_id
        )
        assert ack_at < output_at


def stream_in_turns(clients: list[StreamClient], jpeg: bytes, first_id: int, frames: int) -> list[int]:
    """Each client sends a frame and waits for its output, `frames` times in turn; the round each last ack
    said, in milliseconds."""
    for frame_id in range(first_id, first_id + frames):
        for client in clients:
            client.send_frame(frame_id, jpeg)
        for client in clients:
            client.frame(frame_id, timeout=5)
    return [
        next(m.round_ms for m in reversed(client.received) if is_ack_of(m, first_id + frames - 1))
        for client in clients
    ]


@contextmanager
def two_sessions(render_delay_seconds: float) -> Iterator[tuple[StreamClient, StreamClient]]:
    """Two sessions started on one worker whose engine takes `render_delay_seconds` more per frame."""
    with (
        running_worker(worker_config(preview_delay_seconds=render_delay_seconds)) as running,
        StreamClient.connect(running.ws_url) as first,
        StreamClient.connect(running.ws_url) as second,
    ):
        first.start(new_ticket())
        second.start(new_ticket())
        yield first, second


def test_acks_tell_the_round_of_the_sessions_streaming_now() -> None:
    jpeg = webcam_jpeg(320, 240)
    with two_sessions(0.1) as (first, second):
        assert stream_in_turns([first], jpeg, 1, 1) == [0]  # nothing rendered yet: not known
        alone = stream_in_turns([first], jpeg, 2, 5)[0]
        together = stream_in_turns([first, second], jpeg, 7, 6)
        time.sleep(2.2)  # the second session stops streaming; its turns leave the round
        alone_again = stream_in_turns([first], jpeg, 13, 2)[0]
    render_ms = statistics.median(m.render_ms for m in first.messages(OutputFrame))
    second_ms = statistics.median(m.render_ms for m in second.messages(OutputFrame))
    assert alone == pytest.approx(render_ms, rel=0.2), (alone, render_ms)
    for told in together:  # one frame of each session a round
        assert told == pytest.approx(render_ms + second_ms, rel=0.2), (together, render_ms, second_ms)
    assert alone_again == pytest.approx(render_ms, rel=0.2), (alone_again, render_ms)


def test_a_session_whose_camera_is_slower_than_its_turns_leaves_the_others_a_shorter_round() -> None:
    jpeg = webcam_jpeg(320, 240)
    with two_sessions(0.1) as (fast, slow):
        for turn in range(1, 25):  # the slow session sends a frame every fourth turn of the fast one
            clients = [fast, slow] if turn % 4 == 1 else [fast]
            stream_in_turns(clients, jpeg, turn, 1)
        told = [ack.round_ms for ack in fast.messages(Ack)][-4:]
    render_ms = statistics.median(m.render_ms for m in fast.messages(OutputFrame))
    # Both sessions every turn would be a round of two renders; the slow one uses about a third of its
    # turns, so the fast one is told a round of about one and a third.
    for round_ms in told:
        assert 1.15 * render_ms <= round_ms <= 1.7 * render_ms, (told, render_ms)


def test_a_worker_that_batches_sessions_says_no_round() -> None:
    jpeg = webcam_jpeg(320, 240)
    with (
        running_worker(worker_config(preview_delay_seconds=0.05, max_batch=2)) as running,
        StreamClient.connect(running.ws_url) as client,
    ):
        assert client.start(new_ticket()).pace is False
        stream_in_turns([client], jpeg, 1, 4)
    assert [ack.round_ms for ack in client.messages(Ack)] == [0, 0, 0, 0]


def test_a_paced_session_gets_the_engine_rate_one_frame_per_render_each_waiting_a_margin() -> None:
    # One frame per engine call (MAX_BATCH 1, the default): the worker's `ready` asks clients to pace.
    with running_worker(worker_config(preview_delay_seconds=RENDER_DELAY_SECONDS)) as running:
        paced, camera_rate = (
            asyncio.run(
                run_load(running.ws_url, SECRET, sessions=1, seconds=4.0, fps=30.0, steps=2, pacing=pacing)
            )["per_session"][0]
            for pacing in (None, False)
        )
    assert paced["pacing"] is True
    assert camera_rate["pacing"] is False
    for session in (paced, camera_rate):
        assert session["max_unacked"] <= 2
        assert session["acks"] >= session["sent"] - 2  # all but the last frame or two, still on the wire
        assert not session["errors"]
        # The engine is never idle: outputs come as fast as it renders.
        engine_fps = 1000 / session["render_ms_mean"]
        assert session["steady_fps"] >= 0.9 * engine_fps, session
    # At camera rate most frames are replaced unrendered, and the one rendered waited for whatever was left
    # of the render before it...
    assert camera_rate["sent"] >= 2 * camera_rate["delivered"], camera_rate
    assert camera_rate["latency_p50_ms"] <= 1.5 * camera_rate["render_ms_p50"], camera_rate
    # ...while a paced client sends one frame per render, timed to arrive just before the engine is free: it
    # waits the pacer's margin at most, and its latency is about one render. (A camera-rate frame waits
    # whatever the camera's phase against the renders leaves, 0-33 ms at 30 FPS, half an interval on
    # average; but a render of about three camera intervals, as here on a busy machine, locks it to one phase
    # for a whole run, so one run's camera-rate wait is no yardstick for the paced one.)
    # (Its first outputs come one frame at a time, each waiting about a render by design: "settled" leaves
    # them out, and the camera-rate client, never settling, keeps every frame in its settled figures.)
    assert paced["sent"] <= paced["delivered"] + 3, paced
    assert paced["settled_wait_ms_p50"] <= 1000 * MAX_MARGIN, paced
    assert paced["settled_latency_p50_ms"] <= 1.3 * paced["render_ms_p50"], paced
    assert paced["settling_outputs"] >= 1, paced
    assert camera_rate["settling_outputs"] == 0, camera_rate
    assert camera_rate["settled_wait_ms_p50"] == camera_rate["wait_ms_p50"], camera_rate


def test_four_paced_sessions_take_turns_at_about_one_render_of_latency() -> None:
    with running_worker(worker_config(preview_delay_seconds=RENDER_DELAY_SECONDS)) as running:
        four = asyncio.run(run_load(running.ws_url, SECRET, sessions=4, seconds=5.0, fps=30.0, steps=2))
    sessions = four["per_session"]
    rates = [session["fps"] for session in sessions]
    assert min(rates) >= 0.8 * sum(rates) / len(rates), rates
    for session in sessions:
        assert session["pacing"] is True
        assert session["max_unacked"] <= 2
        assert session["delivered"] >= 5
        # One frame per turn, hardly any replaced unrendered...
        assert session["sent"] <= 1.2 * session["delivered"] + 3, session
        # ...each timed to its turn once the pacer has settled: it waits a margin, not a render of another
        # session's frame in front of it (which would make the latency two renders). A session's first
        # outputs go one frame at a time and each waits about a round by design; in a 5-second run they are
        # a quarter of its 8-14 outputs, enough to move a median, so these figures leave them out. The
        # margin and the way back (the socket, the client's decode) come on top of the render: settled
        # waits of 0.12-0.43 renders and latencies of 1.14-1.46 renders in eight runs with both cores busy.
        assert session["settled_wait_ms_p50"] <= 0.5 * session["render_ms_p50"], session
        assert session["settled_latency_p50_ms"] <= 1.75 * session["render_ms_p50"], session


def test_four_sessions_each_get_a_fair_share_of_the_engine() -> None:
    # A worker that batches sessions (MAX_BATCH 4) asks clients for camera rate, so that a frame of every
    # session waits at each batch boundary.
    with running_worker(worker_config(preview_delay_seconds=RENDER_DELAY_SECONDS, max_batch=4)) as running:
        single = asyncio.run(run_load(running.ws_url, SECRET, sessions=1, seconds=3.0, fps=30.0, steps=2))
        batches = -running.metric("stylecast_worker_batch_size_count")
        batch_frames = -running.metric("stylecast_worker_batch_size_sum")
        four = asyncio.run(run_load(running.ws_url, SECRET, sessions=4, seconds=5.0, fps=30.0, steps=2))
        batches += running.metric("stylecast_worker_batch_size_count")
        batch_frames += running.metric("stylecast_worker_batch_size_sum")
    sessions = four["per_session"]
    rates = [session["fps"] for session in sessions]
    fair_share = sum(rates) / len(rates)
    assert min(rates) >= 0.8 * fair_share, rates
    assert four["min_session_share"] >= 0.8
    # Batching four sessions costs no throughput against one session alone.
    assert four["aggregate_fps"] >= 0.9 * single["aggregate_fps"], (four["aggregate_fps"], single)
    for session in sessions:
        assert session["pacing"] is False
        assert session["max_unacked"] <= 2
        assert session["delivered"] >= 5
        # Latency stays near one (batch) render here too, not a render plus a queue.
        assert session["latency_p50_ms"] <= 1.5 * session["render_ms_p50"], session
    # Every session had a frame waiting at (nearly) every batch boundary: the batches were full.
    assert batch_frames / batches >= 3.0
