"""The ledger's rules one at a time, as docs/metering.md states them."""

from __future__ import annotations

import pytest

from billing.ledger import (
    DEFAULT_POLICY,
    LedgerRefused,
    Refusal,
    apply_report,
    available_seconds,
    claim_stream,
    reserve_stream,
)
from billing.metadata import BillingMetadata
from billing.plans import PlanCatalogue
from inference.protocol import StreamClaim
from inference.tickets import LEEWAY_SECONDS
from tests.billing.test_ledger_properties import T0, report, subscribe

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


def _claim(stream_id: str, worker: str = "gpu-a") -> StreamClaim:
    return StreamClaim(stream_id=stream_id, user_id="user_1", worker_id=worker, ticket_id="t1", sent_at=0.0)


def test_a_stream_is_granted_to_its_first_claim_only_even_after_reports(catalogue: PlanCatalogue) -> None:
    reserved = reserve_stream(BillingMetadata(), catalogue, now=T0)
    claimed = claim_stream(reserved.metadata, _claim(reserved.stream_id), now=T0 + 1)
    assert claimed.private.streams[reserved.stream_id].claimed
    # Reports keep the claim: a second worker presenting the same ticket later is still refused.
    reported = apply_report(claimed, report(reserved.stream_id, 10), catalogue, now=T0 + 20).metadata
    with pytest.raises(LedgerRefused) as refused:
        claim_stream(reported, _claim(reserved.stream_id, "gpu-b"), now=T0 + 21)
    assert refused.value.reason is Refusal.ALREADY_CLAIMED


def test_claims_for_streams_not_issued_or_ended_are_refused(catalogue: PlanCatalogue) -> None:
    reserved = reserve_stream(BillingMetadata(), catalogue, now=T0)
    with pytest.raises(LedgerRefused) as unknown:
        claim_stream(reserved.metadata, _claim(f"st_{T0}_0123456789ab"), now=T0 + 1)
    assert unknown.value.reason is Refusal.UNKNOWN_STREAM
    # A ticket never presented within its life: its stream has ended, and so has the reservation.
    with pytest.raises(LedgerRefused) as ended:
        claim_stream(reserved.metadata, _claim(reserved.stream_id), now=T0 + STALE + 1)
    assert ended.value.reason is Refusal.STREAM_ENDED
    final = apply_report(reserved.metadata, report(reserved.stream_id, 0, final=True), catalogue, now=T0 + 2)
    with pytest.raises(LedgerRefused):
        claim_stream(final.metadata, _claim(reserved.stream_id), now=T0 + 3)


def test_a_ticket_never_claimed_frees_its_reservation_when_it_expires(catalogue: PlanCatalogue) -> None:
    # The socket was lost before the hello: nothing can stream on the ticket once it has expired.
    first = reserve_stream(BillingMetadata(), catalogue, now=T0)
    expired = T0 + DEFAULT_POLICY.ticket_ttl_seconds + LEEWAY_SECONDS + 1
    with pytest.raises(LedgerRefused):
        reserve_stream(first.metadata, catalogue, now=expired - 2)
    assert reserve_stream(first.metadata, catalogue, now=expired).allowance_seconds == 60
    # A claimed stream that has not reported yet is a stream starting: it keeps its reservation longer.
    claimed = claim_stream(first.metadata, _claim(first.stream_id), now=T0 + 2)
    with pytest.raises(LedgerRefused) as held:
        reserve_stream(claimed, catalogue, now=expired)
    assert held.value.reason is Refusal.MINUTES_IN_USE
