"""What a client can know for certain about the seconds a worker billed for its stream.

The worker bills a wall-clock second when it delivers a styled frame in it (inference/billable_time.py): it
reads its clock after the render and before it writes the frame. That instant comes after the client sent the
input frame plus the time the frame's header says it waited for the engine and rendered (the wait counts from
the frame's arrival, which is after its sending), and before the client received the output. Client and
workers run on one machine and read one clock, so for output frame i the billed second is some b_i in
[floor(earliest_i), floor(received_i)], and the b_i never decrease (a session's frames are delivered one after
another). The worker's count is the number of distinct b_i; `delivered_bounds` gives the fewest and the most
distinct values any such choice allows. When no frame's interval straddles a second boundary both are the
number of distinct seconds in which the client received a frame.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


def delivered_bounds(frames: Sequence[tuple[float, float]]) -> tuple[int, int]:
    """(fewest, most) billable seconds for output frames given as (earliest possible delivery, received),
    in the order they arrived."""
    intervals = [(math.floor(earliest), math.floor(received)) for earliest, received in frames]
    for (lo, hi), (next_lo, next_hi) in itertools.pairwise(intervals):
        if hi < lo or next_lo < lo or next_hi < hi:
            raise ValueError("frames must be in arrival order, each received after it was sent")
    if intervals and intervals[-1][1] < intervals[-1][0]:
        raise ValueError("a frame was received before it was sent")

    # Most: every frame opens a new second as early as it can.
    most, last = 0, None
    for lo, hi in intervals:
        candidate = lo if last is None else max(lo, last + 1)
        if candidate <= hi:
            most, last = most + 1, candidate

    # Fewest: consecutive frames share a second while their intervals have one in common. The intervals'
    # ends never decrease, so a run's common part is [its last lo, its first hi].
    fewest, common = 0, None
    for lo, hi in intervals:
        if common is None or max(common[0], lo) > min(common[1], hi):
            fewest, common = fewest + 1, (lo, hi)
        else:
            common = (max(common[0], lo), min(common[1], hi))
    return fewest, most


def received_seconds(frames: Sequence[tuple[float, float]]) -> int:
    """Distinct wall-clock seconds in which the client received at least one output frame."""
    return len({math.floor(received) for _, received in frames})
