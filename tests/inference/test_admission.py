"""A worker admits sessions only while each keeps MIN_SESSION_FPS at the engine's measured render time, and
closes sessions that send nothing: both are what lets Modal scale out before a viewer watches a slideshow."""

from __future__ import annotations

import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from inference.admission import Admission
from inference.protocol import CloseCode, Error, ErrorCode
from tests.inference.helpers import (
    StreamClient,
    new_ticket,
    running_worker,
    wait_for,
    webcam_jpeg,
    worker_config,
)

TURBO_ON_AN_H200 = 1 / 30  # seconds per frame
EXACT_ON_AN_H200 = 1 / 14


def _measured(seconds: float, mode: str = "exact", frames: int = 5) -> Admission:
    admission = Admission(min_session_fps=12)
    for _ in range(frames):
        admission.observe(mode, seconds)
    return admission


def test_a_30_fps_engine_takes_two_sessions_at_12_fps_and_refuses_the_third() -> None:
    admission = _measured(TURBO_ON_AN_H200, "turbo")
    assert admission.admits([], "turbo")
    assert admission.admits(["turbo"], "turbo")  # 15 FPS each
    assert not admission.admits(["turbo", "turbo"], "turbo")  # 10 FPS each
    assert admission.capacity("turbo") == 2


def test_a_14_fps_engine_takes_one_session() -> None:
    admission = _measured(EXACT_ON_AN_H200)
    assert admission.admits([], "exact")  # a worker with no session always takes one
    assert not admission.admits(["exact"], "exact")  # 7 FPS each
    assert admission.capacity("exact") == 1


def test_the_modes_in_use_add_up() -> None:
    admission = _measured(TURBO_ON_AN_H200, "turbo")
    for _ in range(5):
        admission.observe("exact", EXACT_ON_AN_H200)
    # One exact session alone leaves 1/(1/14 + 1/30) = 9.5 FPS for a turbo newcomer: refused.
    assert not admission.admits(["exact"], "turbo")
    assert admission.session_fps(["exact", "turbo"]) == pytest.approx(1 / (1 / 14 + 1 / 30))


def test_a_cold_engine_admits_and_one_slow_frame_does_not_close_the_doors() -> None:
    admission = Admission(min_session_fps=12)
    assert admission.admits(["exact", "exact"], "exact")  # nothing measured yet
    admission = _measured(TURBO_ON_AN_H200, "turbo", frames=9)
    admission.observe("turbo", 4.0)  # a mode compiling on first use
    assert admission.admits(["turbo"], "turbo")
    # An unmeasured mode counts as the cheapest measured one.
    assert admission.frame_seconds("fast") == pytest.approx(TURBO_ON_AN_H200)


def test_a_round_is_every_streaming_sessions_frame_over_the_replicas() -> None:
    admission = Admission(min_session_fps=12)
    exact, turbo = (EXACT_ON_AN_H200, None), (TURBO_ON_AN_H200, None)
    assert admission.round_seconds([exact] * 4) == pytest.approx(4 * EXACT_ON_AN_H200)
    assert admission.round_seconds([exact, turbo]) == pytest.approx(EXACT_ON_AN_H200 + TURBO_ON_AN_H200)
    admission.replicas = 2  # a round is spread over both: a session alone has a frame on each
    assert admission.round_seconds([exact]) == pytest.approx(EXACT_ON_AN_H200 / 2)
    assert admission.round_seconds([exact] * 4) == pytest.approx(2 * EXACT_ON_AN_H200)
    assert admission.round_seconds([]) is None  # nothing streams


def test_a_session_slower_than_its_turns_counts_only_the_turns_it_uses() -> None:
    admission = Admission(min_session_fps=12)
    # Two turbo sessions: a turn every 2/30 s each. A 10 FPS camera uses half of its turns...
    every_turn = 2 * TURBO_ON_AN_H200
    round_seconds = admission.round_seconds([(TURBO_ON_AN_H200, None), (TURBO_ON_AN_H200, 0.1)])
    assert round_seconds == pytest.approx(TURBO_ON_AN_H200 + TURBO_ON_AN_H200 * every_turn / 0.1)
    # ...so the other session gets a turn more often than one in two renders.
    assert TURBO_ON_AN_H200 < round_seconds < every_turn


def _stream_until_measured(client: StreamClient, frames: int = 4) -> None:
    jpeg = webcam_jpeg(160, 120)
    for frame_id in range(1, frames + 1):
        client.send_frame(frame_id, jpeg)
        client.frame(frame_id, timeout=10)


def test_the_worker_refuses_a_session_that_would_drop_everyone_below_the_floor() -> None:
    # At least 500 ms a frame (2 FPS in total): a third session would get under 0.67 FPS, below the floor
    # of 0.68, while two keep it as long as a frame costs under 735 ms. On top of the delay, the preview
    # filters and the loop around them took 30-145 ms a frame here (by prompt and load), well inside that;
    # with a shorter delay they are too large a share of the frame for a floor to fall between two sessions
    # and three.
    config = worker_config(preview_delay_seconds=0.5, min_session_fps=0.68)
    with running_worker(config) as running:
        with StreamClient.connect(running.ws_url) as first, StreamClient.connect(running.ws_url) as second:
            assert first.admitted is not None
            assert second.admitted is not None
            first.start(new_ticket())
            second.start(new_ticket())
            _stream_until_measured(first)
            with StreamClient.connect(running.ws_url) as third:
                # Refused at once, before the client spent a ticket on it, with the "full" code.
                assert third.admitted is None
                assert third.close_code == CloseCode.WORKER_FULL
            # /health and /metrics are answered while the worker is full, and take no session's place.
            assert httpx.get(f"{running.url}/health").status_code == 200
            assert httpx.get(f"{running.url}/metrics").status_code == 200
            assert running.metric("stylecast_worker_sessions_refused_total") == 1
            # The admitted sessions still stream.
            second.send_frame(50, webcam_jpeg(160, 120))
            second.frame(50)
        # Once a session has left, the next one is admitted.
        wait_for(lambda: running.metric("stylecast_worker_sessions") == 0)
        with StreamClient.connect(running.ws_url) as fourth:
            assert fourth.admitted is not None
            fourth.start(new_ticket())


def test_a_slow_engine_still_serves_one_session() -> None:
    # 200 ms a frame is 5 FPS, below the floor even alone: one viewer is served, the next is sent away.
    config = worker_config(preview_delay_seconds=0.2, min_session_fps=12)
    with running_worker(config) as running, StreamClient.connect(running.ws_url) as only:
        only.start(new_ticket())
        _stream_until_measured(only, frames=2)
        with StreamClient.connect(running.ws_url) as another:
            assert another.close_code == CloseCode.WORKER_FULL


def test_connections_waiting_for_their_hello_hold_a_place() -> None:
    # Two connections arriving together cannot both take the last place (the floor as above).
    config = worker_config(preview_delay_seconds=0.5, min_session_fps=0.68)
    with running_worker(config) as running, StreamClient.connect(running.ws_url) as first:
        first.start(new_ticket())
        _stream_until_measured(first)
        with StreamClient.connect(running.ws_url) as waiting:  # admitted, no hello yet
            assert waiting.admitted is not None
            with StreamClient.connect(running.ws_url) as late:
                assert late.close_code == CloseCode.WORKER_FULL


def test_a_session_that_sends_no_frame_is_closed_as_idle() -> None:
    config = worker_config(idle_timeout_seconds=0.6)
    with running_worker(config) as running, StreamClient.connect(running.ws_url) as client:
        client.start(new_ticket())
        _stream_until_measured(client, frames=2)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            client.receive_until(lambda message: False, timeout=5)
        assert client.close_code == CloseCode.IDLE
        assert 0.4 <= time.monotonic() - started <= 3
        wait_for(lambda: running.metric("stylecast_worker_sessions") == 0)
        assert running.metric("stylecast_worker_sessions_idle_total") == 1


def test_frames_keep_an_idle_timeout_away() -> None:
    config = worker_config(idle_timeout_seconds=0.6)
    with running_worker(config) as running, StreamClient.connect(running.ws_url) as client:
        client.start(new_ticket())
        jpeg = webcam_jpeg(160, 120)
        for frame_id in range(1, 8):  # 1.4 s of frames every 0.2 s
            client.send_frame(frame_id, jpeg)
            client.frame(frame_id)
            time.sleep(0.2)
        assert client.close_code is None
        assert running.metric("stylecast_worker_sessions_idle_total") == 0


def test_a_connection_says_the_mode_it_starts_in_and_admission_counts_it() -> None:
    admission = _measured(TURBO_ON_AN_H200, "turbo")
    for _ in range(5):
        admission.observe("exact", EXACT_ON_AN_H200)
    # With one turbo session, a newcomer in turbo keeps both at 15 FPS; one in exact would not.
    assert admission.admits(["turbo"], "turbo")
    assert not admission.admits(["turbo"], "exact")


def test_the_socket_urls_mode_is_the_sessions_first_mode() -> None:
    with running_worker(worker_config()) as running:
        with StreamClient.connect(running.ws_url + "?mode=preview") as client:
            assert client.start(new_ticket()).mode == "preview"
        with StreamClient.connect(running.ws_url + "?mode=watercolour") as client:
            ready = client.start(new_ticket())
            assert ready.mode == "preview"  # the engine's default
            errors = client.messages(Error)
            assert [error.code for error in errors] == [ErrorCode.BAD_PARAMS]
