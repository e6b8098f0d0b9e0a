"""Property tests of the pure usage ledger (billing/ledger.py).

A simulated worker streams for one user: tickets for up to three concurrent streams (tabs), a report of
the cumulative billable seconds every 5 seconds, each report delivered one to three times with random
delays (so duplicated, retried and reordered), a worker that may crash at any point, and, on a paid plan,
renewals in the middle of it all, applied by the real webhook code. Whatever happens, what the account
is charged equals what was delivered, minus at most the one unreported interval of each crash, and
never more.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.ledger import (
    DEFAULT_POLICY,
    Folded,
    LedgerPolicy,
    LedgerRefused,
    Refusal,
    Reservation,
    apply_report,
    is_live,
    new_stream_id,
    reserve_stream,
)
from billing.metadata import BillingMetadata, encode_metadata
from billing.plans import PlanCatalogue, PlanId
from billing.webhooks import SubscriptionItemSnapshot, SubscriptionSnapshot, apply_subscription
from inference.protocol import UsageReport

T0 = 1_700_000_000
REPORT_INTERVAL = 5  # the worker reports at least this often while a stream is open


def subscribe(
    metadata: BillingMetadata, catalogue: PlanCatalogue, *, term_start: int, version: int
) -> BillingMetadata:
    """An active Pro subscription whose term starts at `term_start`, as ChargeBee's webhooks apply it."""
    snapshot = SubscriptionSnapshot(
        id="sub_prop",
        customer_id="user_prop",
        status="active",
        resource_version=version,
        created_at=T0 - 10_000,
        current_term_start=term_start,
        current_term_end=term_start + 30 * 86_400,
        subscription_items=[
            SubscriptionItemSnapshot(item_price_id=catalogue.get(PlanId.PRO).item_price_id or "")
        ],
    )
    outcome = apply_subscription(metadata, snapshot, catalogue)
    assert outcome.metadata is not None, outcome.reason
    return outcome.metadata


def report(stream_id: str, seconds: int, *, final: bool = False) -> UsageReport:
    return UsageReport(
        stream_id=stream_id, user_id="user_prop", worker_id="gpu-1", seconds=seconds, final=final, sent_at=0.0
    )


def charged(metadata: BillingMetadata, wiped: int = 0) -> int:
    """Every second the account was ever charged: both counters plus what renewals zeroed."""
    return wiped + metadata.public.seconds_used + metadata.public.free_seconds_used


def reserve(
    metadata: BillingMetadata,
    catalogue: PlanCatalogue,
    now: int,
    index: int,
    policy: LedgerPolicy = DEFAULT_POLICY,
) -> Reservation | Refusal:
    try:
        return reserve_stream(
            metadata, catalogue, now=now, stream_id=new_stream_id(now, f"{index:012x}"), policy=policy
        )
    except LedgerRefused as refused:
        return refused.reason


def fold(
    metadata: BillingMetadata, usage: UsageReport, catalogue: PlanCatalogue, now: int, policy: LedgerPolicy
) -> Folded | Refusal:
    try:
        return apply_report(metadata, usage, catalogue, now=now, policy=policy)
    except LedgerRefused as refused:
        return refused.reason


@dataclass
class Run:
    """What the simulated worker really did with one stream."""

    stream_id: str = ""
    delivered: int = 0  # billable seconds the user actually got
    crash_loss_bound: int = 0  # seconds delivered after the last report before a crash (0: no crash)
    highest_arrived: int = 0  # highest cumulative value that reached the app
    crashed: bool = False


@dataclass(order=True)
class Event:
    at: int
    seq: int
    kind: str = field(compare=False)
    run: int = field(compare=False, default=-1)
    seconds: int = field(compare=False, default=0)
    final: bool = field(compare=False, default=False)


@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_every_delivered_second_is_charged_once(catalogue: PlanCatalogue, data: st.DataObject) -> None:
    paid = data.draw(st.booleans(), label="paid")
    max_delay = data.draw(st.sampled_from([0, 5, 20, 45]), label="max_delay")
    streams = data.draw(st.integers(1, 3), label="streams")
    metadata = (
        subscribe(BillingMetadata(), catalogue, term_start=T0 - 100, version=1) if paid else BillingMetadata()
    )

    seq = itertools.count()
    queue: list[Event] = []
    for index in range(streams):
        heapq.heappush(
            queue, Event(T0 + data.draw(st.integers(0, 90), label="ticket_at"), next(seq), "ticket", index)
        )
    if paid:
        for at in data.draw(st.lists(st.integers(0, 150), max_size=2), label="renewals"):
            heapq.heappush(queue, Event(T0 + at, next(seq), "renew"))

    runs = [Run() for _ in range(streams)]
    wiped = 0
    version = 1
    while queue:
        event = heapq.heappop(queue)
        now = event.at
        if event.kind == "ticket":
            reservation = reserve(metadata, catalogue, now, event.run)
            if isinstance(reservation, Refusal):
                # A tab opened while another stream is live gets only what that one cannot use.
                assert reservation in (Refusal.OUT_OF_MINUTES, Refusal.MINUTES_IN_USE)
                assert reservation is Refusal.MINUTES_IN_USE or not paid
                continue
            metadata = reservation.metadata
            run = runs[event.run]
            run.stream_id = reservation.stream_id
            for sent_at, seconds, final in simulate_worker(data, run, reservation.allowance_seconds, now):
                for _ in range(data.draw(st.integers(1, 3), label="copies")):
                    delay = data.draw(st.integers(0, max_delay), label="delay")
                    heapq.heappush(
                        queue, Event(sent_at + delay, next(seq), "report", event.run, seconds, final)
                    )
        elif event.kind == "report":
            run = runs[event.run]
            metadata = apply_report(
                metadata, report(run.stream_id, event.seconds, final=event.final), catalogue, now=now
            ).metadata
            run.highest_arrived = max(run.highest_arrived, event.seconds)
        else:
            version += 1
            wiped += metadata.public.seconds_used
            metadata = subscribe(metadata, catalogue, term_start=now, version=version)

        # Nothing is ever charged that no report carried, and no stream more than it delivered.
        assert charged(metadata, wiped) <= sum(run.highest_arrived for run in runs)
        for run in runs:
            entry = metadata.private.streams.get(run.stream_id)
            if entry is not None:
                assert entry.seconds <= run.delivered
        if not paid and max_delay <= 20:
            # Reports arrive within the stale window, so reservations hold: tabs together never exceed
            # the Free allowance.
            assert metadata.public.free_seconds_used <= catalogue.free.seconds
        if paid:
            assert metadata.public.free_seconds_used == 0

    delivered = sum(run.delivered for run in runs)
    assert delivered - sum(run.crash_loss_bound for run in runs) <= charged(metadata, wiped) <= delivered
    if not any(run.crashed for run in runs):
        assert charged(metadata, wiped) == delivered
    later = queue_end(runs) + DEFAULT_POLICY.ticket_ttl_seconds + DEFAULT_POLICY.stale_after_seconds + 60
    assert not any(is_live(sid, entry, later) for sid, entry in metadata.private.streams.items()), (
        "every stream ends: by its final report or by the timeout"
    )


def simulate_worker(
    data: st.DataObject, run: Run, allowance: int, started: int
) -> list[tuple[int, int, bool]]:
    """The reports one stream sends: (sent at, cumulative seconds, final). Fills in what it delivered."""
    per_interval = data.draw(st.lists(st.integers(0, REPORT_INTERVAL), min_size=1, max_size=14), label="work")
    # The worker never delivers beyond the ticket's allowance (it closes the socket with 4402).
    cumulative = [min(allowance, total) for total in itertools.accumulate(per_interval)]
    crash_after = data.draw(st.none() | st.integers(0, len(per_interval) - 1), label="crash_after")
    if crash_after is None:
        run.delivered = cumulative[-1]
        last = len(cumulative) - 1
        return [
            (started + REPORT_INTERVAL * (i + 1), seconds, i == last) for i, seconds in enumerate(cumulative)
        ]
    # Crash during interval `crash_after + 1`: what was delivered since the last report is never reported.
    reported = cumulative[crash_after - 1] if crash_after else 0
    partial = data.draw(st.integers(0, per_interval[crash_after]), label="partial")
    run.crashed = True
    run.delivered = min(allowance, reported + partial)
    run.crash_loss_bound = run.delivered - reported
    assert run.crash_loss_bound <= REPORT_INTERVAL
    return [(started + REPORT_INTERVAL * (i + 1), cumulative[i], False) for i in range(crash_after)]


def queue_end(runs: list[Run]) -> int:
    return T0 + 90 + REPORT_INTERVAL * 15 + 45


@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_pruned_streams_are_refused_never_counted_again(
    catalogue: PlanCatalogue, data: st.DataObject
) -> None:
    """With a tiny ledger, entries are pruned while late duplicates are still on their way: those are
    refused (a 4xx to the worker), never counted a second time, and the ledger stays within its cap."""
    policy = LedgerPolicy(
        max_entries=data.draw(st.integers(1, 3), label="max_entries"),
        horizon_seconds=data.draw(st.sampled_from([40, 120, 3600]), label="horizon"),
    )
    metadata = subscribe(BillingMetadata(), catalogue, term_start=T0 - 100, version=1)
    seq = itertools.count()
    queue: list[Event] = []
    final_seconds: dict[int, int] = {}
    at = T0
    for index in range(data.draw(st.integers(2, 8), label="streams")):
        at += data.draw(st.integers(1, 120), label="gap")
        heapq.heappush(queue, Event(at, next(seq), "ticket", index))
        seconds = data.draw(st.integers(0, 20), label="seconds")
        final_seconds[index] = seconds
        for _ in range(data.draw(st.integers(1, 4), label="copies")):
            delay = data.draw(st.integers(1, 400), label="delay")
            heapq.heappush(queue, Event(at + delay, next(seq), "report", index, seconds, final=True))

    ids: dict[int, str] = {}
    ever_in_ledger: set[str] = set()
    counted: set[int] = set()
    while queue:
        event = heapq.heappop(queue)
        if event.kind == "ticket":
            reservation = reserve(metadata, catalogue, event.at, event.run, policy)
            if isinstance(reservation, Refusal):
                assert reservation is Refusal.MINUTES_IN_USE  # the previous stream is still live
                continue
            metadata = reservation.metadata
            ids[event.run] = reservation.stream_id
        elif event.run in ids:
            stream_id = ids[event.run]
            folded = fold(metadata, report(stream_id, event.seconds, final=True), catalogue, event.at, policy)
            if isinstance(folded, Refusal):
                # Refused only once the stream has been pruned from the ledger.
                assert folded is Refusal.STREAM_EXPIRED
                assert stream_id in ever_in_ledger
                assert stream_id not in metadata.private.streams
            else:
                metadata = folded.metadata
                counted.add(event.run)
        ever_in_ledger |= metadata.private.streams.keys()
        live = sum(is_live(sid, entry, event.at, policy) for sid, entry in metadata.private.streams.items())
        assert len(metadata.private.streams) <= max(policy.max_entries, live)
        # Never more than the streams that got through, each once.
        assert metadata.public.seconds_used == sum(final_seconds[run] for run in counted)


def test_a_busy_account_stays_far_below_clerks_8kb(catalogue: PlanCatalogue) -> None:
    """Hundreds of streams (reconnects, tabs) and the ledger stays about 2.5 KB."""
    metadata = subscribe(BillingMetadata(), catalogue, term_start=T0 - 100, version=1)
    now = T0
    for index in range(300):
        reservation = reserve_stream(
            metadata, catalogue, now=now, stream_id=new_stream_id(now, f"{index:012x}")
        )
        metadata = apply_report(
            reservation.metadata, report(reservation.stream_id, 3, final=True), catalogue, now=now + 7
        ).metadata
        now += 10
    public, private = encode_metadata(metadata)
    size = len(msgspec.json.encode(public)) + len(msgspec.json.encode(private))
    assert len(metadata.private.streams) == DEFAULT_POLICY.max_entries
    assert size < 3 * 1024
    assert metadata.public.seconds_used == 900
