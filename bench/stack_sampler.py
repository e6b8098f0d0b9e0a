"""Where one thread's wall time goes, from its Python stack sampled at a fixed interval.

The cold-start child samples its main thread through the warm-up: a warm start from a warm compile cache is
CPU work on one thread (dynamo's tracing, the caches' lookups, the captures), and a profiler that wraps every
call would change what it measures. Each sample counts once for every function on the stack (inclusive
time, as a flame graph's widths), so the figures say which calls the time was spent under.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import PurePath
from types import FrameType
from typing import Any, Final

DEFAULT_INTERVAL_S: Final = 0.01
DEFAULT_TOP: Final = 40


_REPO_ROOT: Final = PurePath(__file__).parents[1]


def frame_name(frame: FrameType) -> str:
    """``package/module.py:function`` for a frame: the file's path from its top-level package on (the
    part after ``site-packages``, or after the repository for this project's own files)."""
    path = PurePath(frame.f_code.co_filename)
    parts = path.parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif path.is_relative_to(_REPO_ROOT):
        parts = path.relative_to(_REPO_ROOT).parts
    return f"{'/'.join(parts)}:{frame.f_code.co_name}"


class StackSampler:
    """Samples ``thread``'s stack every ``interval_s`` seconds from a daemon thread of its own, from
    ``start()`` to ``stop()``; ``result()`` has each function's inclusive seconds, largest first."""

    def __init__(self, thread: threading.Thread, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if thread.ident is None:
            raise ValueError("the thread to sample has not started")
        self._ident = thread.ident
        self._interval = interval_s
        self._inclusive: Counter[str] = Counter()
        self._exclusive: Counter[str] = Counter()
        self._samples = 0
        self._stopping = threading.Event()
        self._sampler = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._started = 0.0
        self._seconds = 0.0

    def start(self) -> StackSampler:
        self._started = time.perf_counter()
        self._sampler.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._sampler.join()
        self._seconds = time.perf_counter() - self._started

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            frame = sys._current_frames().get(self._ident)
            if frame is None:
                continue
            names: list[str] = []
            while frame is not None:
                names.append(frame_name(frame))
                frame = frame.f_back
            self._exclusive[names[0]] += 1
            self._inclusive.update(set(names))  # recursion counts once per sample
            self._samples += 1

    def result(self, top: int = DEFAULT_TOP) -> dict[str, Any]:
        """``{"seconds", "samples", "interval_s", "inclusive_s": [[function, seconds], ...],
        "exclusive_s": [...]}``: the ``top`` functions by the time spent in them or in what they called,
        and by the time they were the innermost Python frame (a call into C counts for its caller). A
        sample stands for the wall time between samples, so the figures are the samples' share of
        ``seconds``."""
        per_sample = self._seconds / self._samples if self._samples else 0.0

        def seconds(counts: Counter[str]) -> list[list[Any]]:
            return [[name, round(count * per_sample, 3)] for name, count in counts.most_common(top)]

        return {
            "seconds": round(self._seconds, 3),
            "samples": self._samples,
            "interval_s": self._interval,
            "inclusive_s": seconds(self._inclusive),
            "exclusive_s": seconds(self._exclusive),
        }
