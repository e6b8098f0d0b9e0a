"""When a client should send its next frame: one per service interval, timed to reach the worker just
before the engine takes it (docs/protocol.md, "Pacing"). `bench.loadgen` uses this class; the studio's
`Pacer` in app/static/studio.js is the same algorithm in JavaScript, so keep the two in step.

Sent at camera rate instead, a frame waits in the worker's slot for whatever is left of the render before
it, about half a camera interval on average, and most frames are replaced unrendered. Each output frame's
header says how long its input waited for the engine (the worker measures it: arrival to render start;
the client cannot, since an output's own transfer time would count as waiting). The next frame is moved
by (most of) the difference between that wait and a small target (a margin that grows with the jitter of
the waits). The interval is the worker's round, which every `ack` carries (how long a turn of every
streaming session takes, from what each one's latest frames cost), never shorter than the camera's
interval; until the worker says it, the time between outputs stands in. The client cannot tell the round
from its outputs alone: when one session's late frame leaves the engine idle, every session's outputs come
further apart, each pacer takes the longer gaps for its interval, and four sessions that start with long
first renders (each prompt is encoded on its session's first frame) can settle into a cycle that leaves
the engine idle a quarter of the time (docs/performance.md, run AE). For its
first few outputs a session sends one frame at a time (the next when the last comes back): sessions that
start together would otherwise fill the engine's line with frames that each wait a whole round before
any of them knows the interval.

A worker with N engine replicas needs nothing else: its round is spread over the N (a session alone there
gets a turn N times as often), and it reports a late frame's wait as the idle replica's time over N (the
capacity lost), so the correction below moves a one-frame-per-render start to one frame per render / N
within a few outputs instead of to the camera's rate (inference/scheduler.py).

Times are in seconds of a monotonic clock.
"""

from __future__ import annotations

import math
from typing import Final

# Share of each new sample in the running averages of the output interval (a plain mean of the first few,
# so the first outputs set the pace at once) and of the wait and its jitter.
INTERVAL_SMOOTHING: Final = 0.25
WAIT_SMOOTHING: Final = 0.2
# Share of the wait's error applied to the next send. When a newer frame is already on its way it carries
# the same error, so only half is corrected at a time (settles in a few frames without overshooting);
# otherwise nearly all of it.
GAIN: Final = 0.5
GAIN_NOTHING_IN_FLIGHT: Final = 0.9
# The wait aimed for: twice the waits' mean deviation, so a jittery network still arrives before the engine
# is free, within these bounds.
MIN_MARGIN: Final = 0.004
MAX_MARGIN: Final = 0.020
JITTER_MARGINS: Final = 2.0
# Outputs received one frame at a time before pacing starts, and how long such a frame may go unanswered
# (refused, lost) before the next one is sent anyway.
SETTLING_OUTPUTS: Final = 3
SETTLING_TIMEOUT: Final = 1.0
# A gap between outputs longer than this is a pause (a stall, a hidden tab), not the service interval.
MAX_GAP: Final = 2.0


class FramePacer:
    def __init__(self, camera_fps: float) -> None:
        self.camera_interval = 1.0 / camera_fps
        self.round = 0.0  # the worker's round, from its latest ack (0: not said)
        self.measured = self.camera_interval  # the time between outputs, less the engine's idle time
        self.wait = 0.0  # running average of how long rendered frames waited for the engine
        self.jitter = 0.0  # running average of the waits' deviation from that
        self.correction = 0.0  # the next send's shift, from the latest output; used once
        self.outputs = 0
        self._last_sent_id = 0
        self._last_sent_at = -math.inf
        # The camera's next frame: `camera_fps` a second on average (a late frame does not delay the ones
        # after it), never two less than half a camera interval apart.
        self._camera_due = -math.inf
        self._last_output_id = 0
        self._last_output_at: float | None = None
        self._gaps = 0
        self._waits = 0

    @property
    def interval(self) -> float:
        """The session's service interval: the worker's round, or until it says one the time between
        outputs; never shorter than the camera's interval."""
        if self.round > 0:
            return max(self.camera_interval, self.round)
        return self.measured

    @property
    def margin(self) -> float:
        """How long a frame should wait in the worker."""
        return min(max(MIN_MARGIN, JITTER_MARGINS * self.jitter), MAX_MARGIN, self.interval / 4)

    def rendered(self, frame_id: int, waited_ms: int, at: float) -> None:
        """An output for `frame_id` arrived at `at`; the worker says its input waited `waited_ms` (negative:
        the engine had been idle that long when it arrived)."""
        self.outputs += 1
        self._last_output_id = max(self._last_output_id, frame_id)
        waited = waited_ms / 1000
        if self._last_output_at is not None and at - self._last_output_at <= MAX_GAP:
            self._gaps += 1
            share = max(INTERVAL_SMOOTHING, 1 / self._gaps)
            # The engine's time idle for this frame is not part of the session's turn: counted in, a frame
            # late by that much would set the pace at one frame per round trip.
            gap = at - self._last_output_at - max(0.0, -waited)
            self.measured = max(self.camera_interval, self.measured + share * (gap - self.measured))
        self._last_output_at = at
        # Jitter is how much the waits of a settled pace vary: a wait far from the margin is the pace still
        # settling (or a missed turn), which the correction below takes care of. It starts from none and
        # grows only as fast as the running average lets it, so the settling does not count as jitter.
        if self.outputs > SETTLING_OUTPUTS and abs(waited - self.margin) <= MAX_MARGIN:
            if self._waits:
                self.jitter += WAIT_SMOOTHING * (abs(waited - self.wait) - self.jitter)
                self.wait += WAIT_SMOOTHING * (waited - self.wait)
            else:
                self.wait = waited
            self._waits += 1
        gain = GAIN if self._last_sent_id > frame_id else GAIN_NOTHING_IN_FLIGHT
        limit = self.interval / 2
        self.correction = min(max(gain * (waited - self.margin), -limit), limit)

    def acknowledged(self, round_ms: int) -> None:
        """An `ack` arrived; it says the worker's round (0: not known)."""
        self.round = round_ms / 1000

    @property
    def settling(self) -> bool:
        """Whether frames still go one at a time (the next when the last comes back): each such frame
        waits about a whole round, since the interval is not known yet."""
        return self.outputs < SETTLING_OUTPUTS

    def due(self) -> float:
        """When the next frame should be sent (-inf: now). Ask again after each output: it moves."""
        if self.settling:
            if self._last_sent_id > self._last_output_id:  # one frame at a time
                return self._last_sent_at + SETTLING_TIMEOUT
            return self._camera_due
        return max(self._camera_due, self._last_sent_at + self.interval + self.correction)

    def sent(self, frame_id: int, at: float) -> None:
        """Frame `frame_id` was sent at `at` (ids increase): the correction is spent."""
        self._last_sent_id = frame_id
        self._last_sent_at = at
        tick = at if math.isinf(self._camera_due) else max(self._camera_due, at - self.camera_interval / 2)
        self._camera_due = tick + self.camera_interval
        self.correction = 0.0
