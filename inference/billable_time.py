"""Billable time of one stream.

A wall-clock second is billable when at least one styled frame was delivered during it. Counting whole,
distinct seconds (not frames, not connection time) means warming up, a paused camera or a stalled engine
cost the user nothing, and a fast engine costs no more than a slow one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Clock = Callable[[], float]  # Unix seconds; injectable so tests can move time by hand


class BillingMeter:
    def __init__(self, allowance_seconds: int) -> None:
        self.allowance_seconds = allowance_seconds
        self.seconds_used = 0
        self._last_second: int | None = None

    @property
    def seconds_remaining(self) -> int:
        return max(0, self.allowance_seconds - self.seconds_used)

    def exhausted(self, now: float) -> bool:
        """True once the allowance is used and its last billed second is over: nothing more may be
        delivered. The user gets the whole of the last second they pay for."""
        if self.seconds_used < self.allowance_seconds:
            return False
        return self._last_second is None or math.floor(now) > self._last_second

    def record_delivery(self, now: float) -> bool:
        """Count a delivered frame; True when it opened a new billable second."""
        second = math.floor(now)
        # A clock stepped backwards (NTP) must not bill a second twice: only later seconds count.
        if self._last_second is not None and second <= self._last_second:
            return False
        self._last_second = second
        self.seconds_used += 1
        return True
