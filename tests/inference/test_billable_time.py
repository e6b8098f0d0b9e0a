from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inference.billable_time import BillingMeter

T0 = 1_800_000_000.0


def test_distinct_seconds_with_a_delivery_are_billed_once_each() -> None:
    meter = BillingMeter(allowance_seconds=10)
    deliveries = [T0 + 0.1, T0 + 0.5, T0 + 0.99, T0 + 1.0, T0 + 1.7, T0 + 5.2]
    opened = [meter.record_delivery(t) for t in deliveries]
    assert opened == [True, False, False, True, False, True]
    assert (meter.seconds_used, meter.seconds_remaining) == (3, 7)


def test_a_clock_stepping_back_never_bills_a_second_twice() -> None:
    meter = BillingMeter(allowance_seconds=10)
    meter.record_delivery(T0 + 3.5)
    assert not meter.record_delivery(T0 + 2.5)
    assert not meter.record_delivery(T0 + 3.9)
    assert meter.seconds_used == 1


def test_the_last_paid_second_is_usable_to_its_end() -> None:
    meter = BillingMeter(allowance_seconds=2)
    meter.record_delivery(T0)
    assert not meter.exhausted(T0 + 1.2)
    meter.record_delivery(T0 + 1.2)
    assert meter.seconds_remaining == 0
    assert not meter.exhausted(T0 + 1.99)
    assert meter.exhausted(T0 + 2.0)


def test_no_allowance_is_exhausted_from_the_start() -> None:
    assert BillingMeter(allowance_seconds=0).exhausted(T0)


@given(st.lists(st.floats(0, 50, allow_nan=False), max_size=200), st.integers(0, 60))
def test_billing_never_exceeds_the_allowance_when_deliveries_respect_exhausted(
    offsets: list[float], allowance: int
) -> None:
    meter = BillingMeter(allowance_seconds=allowance)
    for offset in sorted(offsets):
        if not meter.exhausted(T0 + offset):
            meter.record_delivery(T0 + offset)
    assert meter.seconds_used <= allowance
    assert meter.seconds_used <= len({int(T0 + offset) for offset in offsets})
