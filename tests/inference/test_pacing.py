"""The pacer against a model of the worker: one session, a network of fixed delay, an engine that renders
one frame at a time, keeps only the latest waiting frame (as inference.scheduler does) and says in each
output how long its input waited, or how long the engine had been idle when it came."""

from __future__ import annotations

import heapq
import itertools
import statistics
from dataclasses import dataclass, field

from inference.pacing import SETTLING_OUTPUTS, SETTLING_TIMEOUT, FramePacer

ONE_WAY = 0.0005  # loopback-like network delay, each way


@dataclass
class Run:
    sent_at: dict[int, float] = field(default_factory=dict)
    rendered: list[int] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # as the engine saw them
    idle: float = 0.0  # engine time without a frame, after the first output


def simulate(render_seconds: float, camera_fps: float = 30.0, seconds: float = 6.0) -> Run:
    pacer = FramePacer(camera_fps)
    run = Run()
    events: list[tuple[float, int, str, int, float]] = []
    order = 0

    def at(time: float, kind: str, frame: int = 0, waited: float = 0.0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (time, order, kind, frame, waited))

    waiting: tuple[int, float] | None = None  # the worker's slot: (frame, arrived)
    busy = False
    free_since = 0.0
    next_frame = 1
    at(0.0, "send")
    while events:
        now, _, kind, frame, waited = heapq.heappop(events)
        if now > seconds:
            break
        if kind == "send":
            if now + 1e-9 < pacer.due():
                continue  # a stale wake-up: the due time moved
            pacer.sent(next_frame, now)
            run.sent_at[next_frame] = now
            at(now + ONE_WAY, "arrive", next_frame)
            next_frame += 1
        elif kind == "arrive":
            waiting = (frame, now)
        elif kind == "done":
            busy, free_since = False, now
            at(now + ONE_WAY, "output", frame, waited)
        elif kind == "output":
            run.rendered.append(frame)
            pacer.rendered(frame, round(waited * 1000), now)
        if not busy and waiting is not None:  # the engine takes the waiting frame
            frame, arrived = waiting
            waiting = None
            run.waits.append(now - arrived)
            if run.rendered:
                run.idle += now - free_since
            busy = True
            # As the scheduler says it: how long the frame waited, or (< 0) how long the engine had idled.
            at(
                now + render_seconds,
                "done",
                frame,
                now - arrived if arrived <= free_since else free_since - arrived,
            )
        if kind in ("send", "output"):
            at(max(now, pacer.due()), "send")
    return run


def test_until_outputs_come_back_one_frame_is_on_its_way_at_a_time() -> None:
    pacer = FramePacer(30.0)
    assert pacer.due() == float("-inf")  # the first frame goes at once
    pacer.sent(1, 10.0)
    assert pacer.due() == 10.0 + SETTLING_TIMEOUT  # not before its output (or a timeout)
    pacer.rendered(1, waited_ms=0, at=10.0712)
    assert pacer.due() == 10.0 + 1 / 30.0  # the next one may go now, a camera interval after the first


def test_a_slow_engine_gets_one_frame_per_render_that_waits_only_the_margin() -> None:
    run = simulate(render_seconds=0.070)
    settled = run.waits[SETTLING_OUTPUTS + 5 :]
    # Every frame sent was rendered (none replaced while waiting)...
    assert len(run.sent_at) - len(run.rendered) <= 2
    # ...the engine hardly ever waited for a frame...
    assert run.idle <= 0.01 * 6.0 + SETTLING_OUTPUTS * 2 * ONE_WAY, run.idle
    # ...and a frame waited a few milliseconds for it, not the half camera interval (17 ms) of camera rate.
    assert 0.001 <= statistics.median(settled) <= 0.008, settled


def test_an_engine_faster_than_the_camera_gets_camera_rate_and_no_more() -> None:
    run = simulate(render_seconds=0.020, seconds=6.0)
    sent = sorted(run.sent_at.values())
    assert 29.0 <= len(sent) / 6.0 <= 30.2
    assert min(b - a for a, b in itertools.pairwise(sent)) >= 0.5 / 30.0
    assert statistics.median(run.waits) < 0.001  # the engine is free whenever a frame arrives


def test_a_pause_does_not_count_as_the_interval() -> None:
    pacer = FramePacer(30.0)
    for frame, time in enumerate((1.0, 1.07, 1.14, 1.21), start=1):
        pacer.sent(frame, time - 0.07)
        pacer.rendered(frame, waited_ms=1, at=time)
    interval = pacer.interval
    assert 0.06 < interval < 0.08
    pacer.sent(5, 1.25)
    pacer.rendered(5, waited_ms=1, at=31.0)  # the tab was hidden for half a minute
    assert pacer.interval == interval
