"""Admission: how many sessions one worker takes before each of them would fall below a watchable rate.

Sessions take turns on the engine (round-robin, one frame each per turn), so when session i renders in a
mode that costs c_i seconds of engine time per frame, every session gets the same rate

    fps = replicas / sum(c_i)

where `replicas` is how many engine replicas are rendering (one per GPU): a round of every session's frame
is spread over all of them, and a session alone has a frame on each (inference/scheduler.py).

A new session (which starts in the engine's default mode) is admitted only while that rate, counting it,
stays at or above MIN_SESSION_FPS. The costs are measured per mode: the time a replica spends on a frame,
its render and the loop around it (the median of the latest frames, so one slow frame, e.g. a mode
compiling on first use or a new prompt being encoded, does not close the doors);
a mode not yet measured counts as the cheapest measured one, and with nothing measured (a cold engine)
sessions are admitted. A worker always takes a session when it has none, so a slow engine still serves one.

The same arithmetic gives the round, sum(c_i) / replicas: how often each streaming session gets a turn,
which the worker tells paced clients in every `ack` (inference/pacing.py). There c_i is what session i's
own latest frames cost (a prompt, a step count or a style image costs more or less than its mode's
median), and a session whose frames come further apart than its turns (a camera slower than its share)
takes only the turns it uses.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from typing import Final

# Frames per mode that the median is taken over.
WINDOW: Final = 15


class Admission:
    def __init__(self, min_session_fps: float, replicas: int = 1) -> None:
        if min_session_fps <= 0:
            raise ValueError("min_session_fps must be positive")
        self.min_session_fps = min_session_fps
        self.replicas = replicas
        self._samples: dict[str, deque[float]] = {}

    @property
    def replicas(self) -> int:
        """The engine replicas rendering now; the worker updates it as they become ready (or fail)."""
        return self._replicas

    @replicas.setter
    def replicas(self, count: int) -> None:
        if count < 1:
            raise ValueError("admission counts at least one replica")
        self._replicas = count

    def observe(self, mode: str, seconds_per_frame: float) -> None:
        """One rendered frame's share of its engine call (render time / frames in the call)."""
        samples = self._samples.get(mode)
        if samples is None:
            samples = self._samples[mode] = deque(maxlen=WINDOW)
        samples.append(seconds_per_frame)

    def frame_seconds(self, mode: str) -> float | None:
        """The measured engine time of one frame in `mode`; None when nothing was measured yet."""
        samples = self._samples.get(mode)
        if samples:
            return statistics.median(samples)
        measured = [statistics.median(s) for s in self._samples.values() if s]
        return min(measured) if measured else None

    def session_fps(self, modes: list[str]) -> float | None:
        """The rate every one of these sessions would get; None when a cost is not known yet."""
        costs = [self.frame_seconds(mode) for mode in modes]
        if not costs or any(cost is None for cost in costs):
            return None
        total = sum(cost for cost in costs if cost is not None)
        return float("inf") if total <= 0 else self.replicas / total

    def round_seconds(self, streams: Sequence[tuple[float, float | None]]) -> float | None:
        """How long one round of these streaming sessions takes, each rendering one frame, over the
        replicas. A stream is what one of its frames costs (seconds of a replica) and, for a session that
        uses only some of its turns (its frames come further apart than its turns), how far apart its
        frames come; None: it uses every turn. None when nothing is streaming."""
        if not streams:
            return None
        every_turn = sum(cost for cost, _ in streams) / self.replicas
        used = sum(cost * min(1.0, every_turn / interval) if interval else cost for cost, interval in streams)
        return used / self.replicas

    def admits(self, modes_in_use: list[str], new_mode: str) -> bool:
        """Whether a session starting in `new_mode` may join sessions rendering in `modes_in_use`."""
        if not modes_in_use:
            return True
        fps = self.session_fps([*modes_in_use, new_mode])
        return fps is None or fps >= self.min_session_fps

    def capacity(self, mode: str) -> int | None:
        """How many sessions in `mode` alone keep the floor on every replica together (at least 1); None
        while unmeasured."""
        cost = self.frame_seconds(mode)
        if cost is None:
            return None
        if cost <= 0:
            return None
        return max(1, int(self.replicas / (cost * self.min_session_fps) + 1e-9))
