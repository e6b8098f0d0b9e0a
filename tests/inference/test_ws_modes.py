"""Render modes over the real `/ws`: `params.mode` picks one of the engine's modes per session, `ready` lists
them, an unknown one is refused as a whole, and one chosen while the engine warms up is checked once it is
ready."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from inference.engines.base import FrameJob
from inference.engines.preview import PreviewEngine
from inference.protocol import Ack, Error, ErrorCode, Ready, RenderMode, Warming
from tests.inference.helpers import StreamClient, new_ticket, running_worker, webcam_jpeg


class ModalEngine:
    """The preview filters behind three modes; records which mode each job asked for."""

    name = "modal"
    model = "Preview filters with modes"
    max_batch = 4
    modes = (
        RenderMode(id="exact", label="Exact", approximate=False, detail="The reference pipeline."),
        RenderMode(id="fast", label="Fast", approximate=True, detail="Fewer text tokens; close, not equal."),
        RenderMode(id="turbo", label="Turbo", approximate=True, detail="One step in FP8; visibly different."),
    )

    def __init__(self, warmup_seconds: float = 0.0) -> None:
        self.warmup_seconds = warmup_seconds
        self.preview = PreviewEngine()
        self.jobs: list[tuple[str, int, str]] = []  # (session id, frame id, mode)
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        time.sleep(self.warmup_seconds)

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        for job in jobs:
            if job.mode not in ("", *(mode.id for mode in self.modes)):
                raise ValueError(f"unknown mode {job.mode!r}")
        with self._lock:
            self.jobs.extend((job.session_id, job.frame_id, job.mode) for job in jobs)
        return [self.preview.render_one(job.jpeg, job.prompt) for job in jobs]

    def modes_of(self, frame_ids: range) -> list[str]:
        with self._lock:
            return [mode for _, frame_id, mode in self.jobs if frame_id in frame_ids]


def test_ready_lists_the_engines_modes_and_params_mode_picks_one_per_session() -> None:
    engine = ModalEngine()
    jpeg = webcam_jpeg()
    with (
        running_worker(engine_factory=lambda: engine) as running,
        StreamClient.connect(running.ws_url) as fast,
        StreamClient.connect(running.ws_url) as default,
    ):
        ready = fast.start(new_ticket(user_id="alice"))
        assert ready.modes == list(ModalEngine.modes)
        assert ready.mode == "exact", "a session starts in the engine's first mode"
        assert default.start(new_ticket(user_id="bob")).mode == "exact"

        fast.send_json('{"type": "params", "mode": "fast"}')
        for frame_id in range(1, 4):
            fast.send_frame(frame_id, jpeg)
            default.send_frame(100 + frame_id, jpeg)
            fast.frame(frame_id)
            default.frame(100 + frame_id)
        # Each session's frames carry its own mode; "" is the engine's default for a session that chose none.
        assert engine.modes_of(range(1, 4)) == ["fast"] * 3
        assert engine.modes_of(range(101, 104)) == [""] * 3

        # Back to the default, live, on the same socket; later params without `mode` keep the mode.
        fast.send_json('{"type": "params", "mode": "exact"}')
        fast.send_json('{"type": "params", "prompt": "anime"}')
        fast.send_frame(10, jpeg)
        fast.frame(10)
        assert engine.modes_of(range(10, 11)) == ["exact"]
        assert not fast.messages(Error)
        assert not default.messages(Error)


def test_an_unknown_mode_is_refused_and_nothing_of_that_params_message_applies() -> None:
    engine = ModalEngine()
    jpeg = webcam_jpeg()
    with (
        running_worker(engine_factory=lambda: engine) as running,
        StreamClient.connect(running.ws_url) as client,
    ):
        client.start(new_ticket())
        client.send_json('{"type": "params", "prompt": "anime", "mode": "turbo"}')
        client.send_json('{"type": "params", "prompt": "pixel art", "mode": "warp-speed"}')
        error = client.error()
        assert error.code == ErrorCode.BAD_PARAMS
        assert "warp-speed" in error.message
        assert "'turbo'" in error.message  # it says what is on offer
        assert error.frame is None

        client.send_frame(1, jpeg)
        assert client.frame(1).jpeg == engine.preview.render_one(jpeg, "anime"), "the prompt did not change"
        assert engine.modes_of(range(1, 2)) == ["turbo"], "the mode did not change"
        assert client.messages(Ack) == [Ack(frame=1)]


def test_a_mode_chosen_while_warming_is_checked_once_the_engine_is_ready() -> None:
    engine = ModalEngine(warmup_seconds=1.0)
    jpeg = webcam_jpeg()
    with (
        running_worker(engine_factory=lambda: engine, wait_ready=False) as running,
        StreamClient.connect(running.ws_url) as valid,
        StreamClient.connect(running.ws_url) as invalid,
    ):
        valid.send_hello(new_ticket(user_id="alice"))
        invalid.send_hello(new_ticket(user_id="bob"))
        assert valid.receive() == Warming()
        assert invalid.receive() == Warming()
        # The modes are unknown until the engine is loaded: both are kept for now, and the rest applies.
        valid.send_json('{"type": "params", "mode": "turbo"}')
        invalid.send_json('{"type": "params", "prompt": "anime", "mode": "warp-speed"}')
        invalid.send_frame(1, jpeg)  # sent while warming: rendered in the default mode, whatever was asked
        assert invalid.receive() == Ack(frame=1)

        ready = valid.receive_until(lambda message: isinstance(message, Ready), timeout=20)
        assert isinstance(ready, Ready)
        assert ready.mode == "turbo"
        assert not valid.messages(Error)

        error = invalid.error(timeout=20)
        assert error.code == ErrorCode.BAD_PARAMS
        assert "warp-speed" in error.message
        ready = invalid.receive_until(lambda message: isinstance(message, Ready))
        assert isinstance(ready, Ready)
        assert ready.mode == "exact", "an unknown mode falls back to the default"
        assert invalid.frame(1).jpeg == engine.preview.render_one(jpeg, "anime")

        valid.send_frame(7, jpeg)
        invalid.send_frame(8, jpeg)
        valid.frame(7)
        invalid.frame(8)
        assert engine.modes_of(range(1, 2)) == [""]
        assert engine.modes_of(range(7, 8)) == ["turbo"]
        assert engine.modes_of(range(8, 9)) == [""]
