"""Billing on the worker: only seconds with a delivered frame count, and the allowance is enforced."""

from __future__ import annotations

import time

from inference.protocol import CloseCode, Usage
from tests.inference.helpers import (
    FakeClock,
    OutputFrame,
    StreamClient,
    new_ticket,
    running_worker,
    webcam_jpeg,
    worker_config,
)


def test_allowance_closes_the_stream_with_4402_within_a_second_of_the_limit() -> None:
    clock = FakeClock()
    jpeg = webcam_jpeg(320, 240)
    with running_worker(clock=clock) as running, StreamClient.connect(running.ws_url) as client:
        client.start(new_ticket(allowance_seconds=2))
        assert client.receive() == Usage(seconds_used=0, seconds_remaining=2)

        client.send_frame(1, jpeg)
        client.frame(1)
        assert client.receive() == Usage(seconds_used=1, seconds_remaining=1)
        # More frames within the same second cost nothing more.
        client.send_frame(2, jpeg)
        client.frame(2)

        clock.advance(1)
        client.send_frame(3, jpeg)
        client.frame(3)
        assert client.receive() == Usage(seconds_used=2, seconds_remaining=0)
        # The last paid second is the user's to the end: frames keep coming until it is over.
        client.send_frame(4, jpeg)
        client.frame(4)

        clock.advance(1)  # the allowance is now used up
        limit_reached = time.monotonic()
        client.send_frame(5, jpeg)
        code = client.wait_closed(timeout=3)
        closed_after = time.monotonic() - limit_reached

        assert code == CloseCode.ALLOWANCE_USED
        assert closed_after < 1.0
        assert [f.frame_id for f in client.messages(OutputFrame)] == [1, 2, 3, 4]
        assert client.messages(Usage)[-1] == Usage(seconds_used=2, seconds_remaining=0)
        assert running.metric("stylecast_worker_billable_seconds_total") == 2


def test_an_idle_stream_whose_allowance_is_used_up_is_closed_too() -> None:
    clock = FakeClock()
    with running_worker(clock=clock) as running, StreamClient.connect(running.ws_url) as client:
        client.start(new_ticket(allowance_seconds=1))
        client.send_frame(1, webcam_jpeg(160, 120))
        client.frame(1)
        clock.advance(1.5)  # no more frames are sent; the paid second is simply over
        started = time.monotonic()
        assert client.wait_closed(timeout=3) == CloseCode.ALLOWANCE_USED
        assert time.monotonic() - started < 1.0
        assert client.messages(Usage)[-1] == Usage(seconds_used=1, seconds_remaining=0)


def test_a_ticket_without_allowance_is_closed_at_once_without_a_frame() -> None:
    with running_worker() as running, StreamClient.connect(running.ws_url) as client:
        client.send_hello(new_ticket(allowance_seconds=0))
        assert client.wait_closed(timeout=3) == CloseCode.ALLOWANCE_USED
        assert client.messages(OutputFrame) == []
        assert client.messages(Usage)[-1] == Usage(seconds_used=0, seconds_remaining=0)


def test_seconds_without_delivered_frames_are_not_billed() -> None:
    clock = FakeClock(start=1_800_000_000.7)
    config = worker_config(preview_warmup_seconds=0.5)
    jpeg = webcam_jpeg(160, 120)
    with running_worker(config, clock=clock, wait_ready=False) as running:
        with StreamClient.connect(running.ws_url) as client:
            client.start(new_ticket(allowance_seconds=100))  # waited through warm-up: free
            clock.advance(30)  # camera paused / tab in background: free
            for second in range(3):
                client.send_frame(second, jpeg)
                client.frame(second)
                clock.advance(0.4)  # frames at :00.7, :01.1, :01.5 touch 2 distinct wall-clock seconds
            usages = client.messages(Usage)
        assert usages[0] == Usage(seconds_used=0, seconds_remaining=100)
        assert usages[-1] == Usage(seconds_used=2, seconds_remaining=98)
        assert running.metric("stylecast_worker_billable_seconds_total") == 2
