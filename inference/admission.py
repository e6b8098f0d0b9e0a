"""Admission: how many sessions one worker takes before each of them would fall below a watchable rate.

Sessions take turns on the engine (round-robin, one frame each per turn), so when session i renders in a
mode that costs c_i seconds of engine time per frame, every session gets the same rate

    fps = replicas / sum(c_i)

where `replicas` is how many engine replicas are rendering (one per GPU): a round of every session's frame
is spread over all of them, and a session alone has a frame on each (inference/scheduler.py).

A new session (which starts in the engine's default mode) is admitted only while that rate, counting it,
stays at or above MIN_SESSION_FPS. The costs are the engine's measured render times per mode (the median
of the latest frames, so one slow frame, e.g. a mode compiling on first use, does not close the doors);
a mode not yet measured counts as the cheapest measured one, and with nothing measured (a cold engine)
sessions are admitted. A worker always takes a session when it has none, so a slow engine still serves one.
"""

from __future__ import annotations

import statistics
from collections import deque
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
