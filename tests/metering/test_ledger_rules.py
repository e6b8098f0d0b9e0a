"""The ledger's rules one at a time, as docs/metering.md states them."""

from __future__ import annotations

import pytest

from billing.ledger import (
    DEFAULT_POLICY,
    LedgerRefused,
    Refusal,
    apply_report,
    available_seconds,
    reserve_stream,
)
from billing.metadata import BillingMetadata
from billing.plans import PlanCatalogue
from tests.metering.test_ledger_properties import T0, report, subscribe

STALE = DEFAULT_POLICY.ticket_ttl_seconds + DEFAULT_POLICY.stale_after_seconds


def test_a_crashed_stream_releases_its_reservation_and_counts_if_it_reports_again(
    catalogue: PlanCatalogue,
) -> None:
    first = reserve_stream(BillingMetadata(), catalogue, now=T0)
    metadata = apply_report(first.metadata, report(first.stream_id, 10), catalogue, now=T0 + 5).metadata
    # Another tab gets nothing while the first stream is live...
    with pytest.raises(LedgerRefused) as refused:
        reserve_stream(metadata, catalogue, now=T0 + 20)
    assert refused.value.reason is Refusal.MINUTES_IN_USE
    # ...and everything left once it has been silent for the timeout.
    second = reserve_stream(metadata, catalogue, now=T0 + 5 + STALE + 1)
    assert second.allowance_seconds == 50
    # The first stream was not dead after all (the app was unreachable): what it reports still counts.
    late = apply_report(second.metadata, report(first.stream_id, 14, final=True), catalogue, now=T0 + 80)
    assert late.added_seconds == 4
    assert late.metadata.public.free_seconds_used == 14


def test_seconds_count_in_the_term_current_when_the_report_is_applied(catalogue: PlanCatalogue) -> None:
    metadata = subscribe(BillingMetadata(), catalogue, term_start=T0 - 100, version=1)
    stream = reserve_stream(metadata, catalogue, now=T0)
    metadata = apply_report(stream.metadata, report(stream.stream_id, 40), catalogue, now=T0 + 40).metadata
    assert metadata.public.seconds_used == 40
    renewed = subscribe(metadata, catalogue, term_start=T0 + 45, version=2)
    assert renewed.public.seconds_used == 0
    # The stream goes on across the renewal: only what it delivered since lands in the new term.
    after = apply_report(renewed, report(stream.stream_id, 55, final=True), catalogue, now=T0 + 60)
    assert after.metadata.public.seconds_used == 15


def test_the_free_allowance_is_for_life(catalogue: PlanCatalogue) -> None:
    stream = reserve_stream(BillingMetadata(), catalogue, now=T0)
    used = apply_report(stream.metadata, report(stream.stream_id, 60, final=True), catalogue, now=T0 + 70)
    assert used.metadata.public.free_seconds_used == 60
    with pytest.raises(LedgerRefused) as refused:
        reserve_stream(used.metadata, catalogue, now=T0 + 90 * 86_400)
    assert refused.value.reason is Refusal.OUT_OF_MINUTES


def test_a_stream_is_never_billed_beyond_its_ticket(catalogue: PlanCatalogue) -> None:
    stream = reserve_stream(BillingMetadata(), catalogue, now=T0)
    over = apply_report(stream.metadata, report(stream.stream_id, 75, final=True), catalogue, now=T0 + 80)
    assert over.metadata.public.free_seconds_used == 60
    assert available_seconds(over.metadata, catalogue, T0 + 81) == 0


def test_a_stream_never_issued_to_the_user_is_refused(catalogue: PlanCatalogue) -> None:
    with pytest.raises(LedgerRefused) as refused:
        apply_report(BillingMetadata(), report(f"st_{T0}_0123456789ab", 5), catalogue, now=T0 + 5)
    assert refused.value.reason is Refusal.UNKNOWN_STREAM
    with pytest.raises(LedgerRefused) as refused:
        apply_report(BillingMetadata(), report("made-up", 5), catalogue, now=T0 + 5)
    assert refused.value.reason is Refusal.MALFORMED_STREAM_ID
