"""The usage ledger: streaming seconds folded into the billing metadata, once each. Pure functions, no I/O.

The worker reports each stream's CUMULATIVE billable seconds (`inference.protocol.UsageReport`) at least
every few seconds and once more, `final`, when the stream ends. Reports arrive at least once and in any
order: the worker retries failed posts, and a retry may overtake an earlier attempt. So a report is never
applied as a delta. The ledger (`PrivateBilling.streams`) keeps, per stream, the cumulative seconds
already folded into the usage counters, and a report adds only `max(0, seconds - folded)`:

* a duplicate or a retry adds nothing; a late, smaller report never lowers a total;
* a crashed worker loses at most what it delivered after its last report (one reporting interval).

Streams and reservations: the app mints every stream id (`new_stream_id`, which carries the issue time)
and records the stream in the ledger when it issues the ticket, with the allowance the ticket grants; a
report for a stream that is not in the user's ledger was not issued to that user and is refused.
While a stream is live its unused allowance stays reserved, so a second tab only gets what the first
one cannot use. A stream stops being live when its final report arrives or when nothing was heard of it
for `stale_after_seconds` (a crashed worker); a timed-out stream that reports again (an app outage, not
a crash) is counted as usual and is live again.

Entries are pruned once they have not been live for `horizon_seconds`, or sooner, oldest first, when the
ledger holds more than `max_entries`. `streams_pruned_before` remembers the newest issue time pruned, and
a report for a stream that is not in the ledger is refused when the stream was issued before the horizon
or at or before that mark (rather than as unknown): a pruned stream can never be counted a second time.

Renewals: seconds are counted into whichever counter applies (`billing.entitlement`) when the app applies
the report. A renewal zeroes `seconds_used` but leaves the ledger alone, so what a stream delivered
before the renewal stays in the old term and only what it delivers after lands in the new one.
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum
from typing import Final

import msgspec

from billing.entitlement import Counter, entitlement
from billing.metadata import BillingMetadata, LedgerEntry, PrivateBilling, PublicBilling
from billing.plans import PlanCatalogue
from inference.protocol import StreamClaim, UsageReport
from inference.tickets import DEFAULT_TTL_SECONDS, LEEWAY_SECONDS

# Stream ids: "st_<unix issue time>_<12 hex>". The random part only has to be unique per user and second.
_STREAM_ID = re.compile(r"^st_(\d{9,11})_([0-9a-f]{12})$")
# Stream ids issued further in the future than this are not ours (clocks of one app agree to the second).
MAX_FUTURE_SKEW_SECONDS: Final = 300


class LedgerPolicy(msgspec.Struct, frozen=True, kw_only=True):
    # A ticket must be presented within this long after issue; its stream is live at least until then.
    ticket_ttl_seconds: int = DEFAULT_TTL_SECONDS
    # The worker reports at least every 5 s while it delivers; this long without a report is a dead stream.
    stale_after_seconds: int = 30
    # How long an entry is kept after the stream stopped being live, and how old a stream may be when the
    # ledger first hears of it. Longer than any retry of a report (the worker gives up within minutes).
    horizon_seconds: int = 6 * 3600
    # About 100 bytes per entry: 24 keep the ledger near 2.5 KB of Clerk's 8 KB metadata.
    max_entries: int = 24


DEFAULT_POLICY: Final = LedgerPolicy()


class Refusal(StrEnum):
    MALFORMED_STREAM_ID = "malformed_stream_id"
    # Not in this user's ledger and too old to tell apart from a stream already pruned from it.
    STREAM_EXPIRED = "stream_expired"
    # Not in this user's ledger: the app never issued this stream's ticket to this user.
    UNKNOWN_STREAM = "unknown_stream"
    # Nothing left on the account: only a plan (or, for paid plans, the next term) helps.
    OUT_OF_MINUTES = "out_of_minutes"
    # What is left is held by the user's other live streams (another tab, or a stream that just ended
    # and whose final report is still on its way): asking again shortly may succeed.
    MINUTES_IN_USE = "minutes_in_use"
    # A claim for a stream that a connection (on this or another worker) already claimed.
    ALREADY_CLAIMED = "already_claimed"
    # A claim for a stream that has ended or whose ticket can no longer be presented.
    STREAM_ENDED = "stream_ended"


class LedgerRefused(Exception):
    """The ledger will not take this report or issue this reservation; `reason` says why."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Folded(msgspec.Struct, frozen=True, kw_only=True):
    """The metadata after one report, and what the report added (0 for a duplicate)."""

    metadata: BillingMetadata
    added_seconds: int
    counter: Counter


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    metadata: BillingMetadata
    stream_id: str
    allowance_seconds: int


def new_stream_id(now: float, token: str | None = None) -> str:
    """A fresh stream id carrying its issue time (`token`: 12 hex digits, for reproducible tests)."""
    random_part = token if token is not None else secrets.token_hex(6)
    stream_id = f"st_{int(now)}_{random_part}"
    if not _STREAM_ID.match(stream_id):
        raise ValueError(f"not a stream id: {stream_id!r}")
    return stream_id


def stream_issued_at(stream_id: str) -> int | None:
    """The issue time encoded in a stream id; None for anything the app did not mint."""
    match = _STREAM_ID.match(stream_id)
    return int(match.group(1)) if match else None


def _issued(stream_id: str) -> int:
    issued = stream_issued_at(stream_id)
    # Only ids that parse ever enter the ledger; 0 keeps a hand-edited entry prunable rather than crashing.
    return issued if issued is not None else 0


def last_seen(stream_id: str, entry: LedgerEntry, policy: LedgerPolicy = DEFAULT_POLICY) -> int:
    """The stream's last sign of life. A ticket not yet presented counts as alive until it expires."""
    return max(entry.reported_at, _issued(stream_id) + policy.ticket_ttl_seconds)


def is_live(stream_id: str, entry: LedgerEntry, now: int, policy: LedgerPolicy = DEFAULT_POLICY) -> bool:
    if entry.final:
        return False
    if not entry.claimed and entry.seconds == 0 and entry.reported_at <= _issued(stream_id):
        # Issued and never claimed by a worker: once its ticket can no longer be presented, nothing will
        # stream on it, so its reservation goes at once rather than after the silence a crash is given.
        return now <= _issued(stream_id) + policy.ticket_ttl_seconds + LEEWAY_SECONDS
    return now - last_seen(stream_id, entry, policy) <= policy.stale_after_seconds


def reserved_seconds(entry: LedgerEntry) -> int:
    """What a live stream may still deliver under its ticket."""
    return max(0, entry.allowance - entry.seconds)


def live_reserved_seconds(private: PrivateBilling, now: int, policy: LedgerPolicy = DEFAULT_POLICY) -> int:
    return sum(
        reserved_seconds(entry)
        for stream_id, entry in private.streams.items()
        if is_live(stream_id, entry, now, policy)
    )


def available_seconds(
    metadata: BillingMetadata, catalogue: PlanCatalogue, now: int, policy: LedgerPolicy = DEFAULT_POLICY
) -> int:
    """What a new stream may be granted now: the seconds left minus what live streams hold."""
    left = entitlement(metadata.public, catalogue).remaining_seconds
    return max(0, left - live_reserved_seconds(metadata.private, now, policy))


def prune(private: PrivateBilling, now: int, policy: LedgerPolicy = DEFAULT_POLICY) -> PrivateBilling:
    """Drop entries not live for `horizon_seconds`, then the oldest non-live ones beyond `max_entries`.
    Live entries are never dropped: they hold reservations and their reports are still to come."""
    keep = dict(private.streams)
    dropped: list[str] = []
    for stream_id, entry in private.streams.items():
        if not is_live(stream_id, entry, now, policy) and now - last_seen(stream_id, entry, policy) > (
            policy.horizon_seconds
        ):
            dropped.append(stream_id)
            del keep[stream_id]
    if len(keep) > policy.max_entries:
        closed = sorted(
            (sid for sid, entry in keep.items() if not is_live(sid, entry, now, policy)),
            key=lambda sid: (_issued(sid), sid),
        )
        for stream_id in closed[: len(keep) - policy.max_entries]:
            dropped.append(stream_id)
            del keep[stream_id]
    if not dropped:
        return private
    mark = max(private.streams_pruned_before, *(_issued(sid) for sid in dropped))
    return msgspec.structs.replace(private, streams=keep, streams_pruned_before=mark)


def apply_report(
    current: BillingMetadata,
    report: UsageReport,
    catalogue: PlanCatalogue,
    *,
    now: int,
    policy: LedgerPolicy = DEFAULT_POLICY,
) -> Folded:
    """Fold one usage report in. Raises LedgerRefused for a stream this user was never issued (or whose
    entry was pruned): answer it with a 4xx, as retrying cannot help."""
    issued = stream_issued_at(report.stream_id)
    if issued is None or issued > now + MAX_FUTURE_SKEW_SECONDS:
        raise LedgerRefused(Refusal.MALFORMED_STREAM_ID, f"{report.stream_id!r} is not a stream id")
    private = current.private
    entry = private.streams.get(report.stream_id)
    if entry is None:
        # Every stream enters the ledger when its ticket is issued, and a live one never leaves it.
        if issued < now - policy.horizon_seconds or issued <= private.streams_pruned_before:
            raise LedgerRefused(
                Refusal.STREAM_EXPIRED,
                f"stream {report.stream_id} is older than the ledger keeps; it cannot be counted safely",
            )
        raise LedgerRefused(
            Refusal.UNKNOWN_STREAM, f"stream {report.stream_id} was not issued to user {report.user_id}"
        )

    billable = min(report.seconds, entry.allowance)
    added = max(0, billable - entry.seconds)
    closes = report.final and not entry.final
    ent = entitlement(current.public, catalogue)

    # A duplicate, a retry or a heartbeat within a few seconds is a sign of life the ledger already has:
    # skipping it keeps Clerk writes for real changes. An older one is written, so the stream stays live.
    refresh = now - entry.reported_at >= policy.stale_after_seconds // 2
    if added == 0 and not closes and not refresh:
        return Folded(metadata=_pruned(current, now, policy), added_seconds=0, counter=ent.counter)

    # replace(), not a new entry: what the report does not change (the allowance, the claim) stays.
    updated_entry = msgspec.structs.replace(
        entry,
        seconds=entry.seconds + added,
        reported_at=max(entry.reported_at, now),
        final=entry.final or report.final,
    )
    public = _add_seconds(current.public, ent.counter, added)
    private = msgspec.structs.replace(private, streams={**private.streams, report.stream_id: updated_entry})
    metadata = BillingMetadata(public=public, private=prune(private, now, policy))
    return Folded(metadata=metadata, added_seconds=added, counter=ent.counter)


def claim_stream(
    current: BillingMetadata, claim: StreamClaim, *, now: int, policy: LedgerPolicy = DEFAULT_POLICY
) -> BillingMetadata:
    """Grant the stream to the connection that claims it first. Raises LedgerRefused for a stream this
    user was not issued, one already claimed, or one that has ended: the worker closes that connection."""
    issued = stream_issued_at(claim.stream_id)
    if issued is None or issued > now + MAX_FUTURE_SKEW_SECONDS:
        raise LedgerRefused(Refusal.MALFORMED_STREAM_ID, f"{claim.stream_id!r} is not a stream id")
    entry = current.private.streams.get(claim.stream_id)
    if entry is None:
        raise LedgerRefused(
            Refusal.UNKNOWN_STREAM, f"stream {claim.stream_id} was not issued to user {claim.user_id}"
        )
    if entry.claimed:
        raise LedgerRefused(Refusal.ALREADY_CLAIMED, f"stream {claim.stream_id} is already being served")
    if not is_live(claim.stream_id, entry, now, policy):
        raise LedgerRefused(Refusal.STREAM_ENDED, f"stream {claim.stream_id} has ended")
    claimed = msgspec.structs.replace(entry, claimed=True, reported_at=max(entry.reported_at, now))
    private = msgspec.structs.replace(
        current.private, streams={**current.private.streams, claim.stream_id: claimed}
    )
    return msgspec.structs.replace(current, private=private)


def reserve_stream(
    current: BillingMetadata,
    catalogue: PlanCatalogue,
    *,
    now: int,
    stream_id: str | None = None,
    policy: LedgerPolicy = DEFAULT_POLICY,
) -> Reservation:
    """Record a new stream with everything the user may still stream that other live streams do not hold.

    The ticket carries all of it (the worker ends a stream whose allowance is used, and the studio takes
    that as "out of minutes"), so while one stream is live a second one only gets what the first cannot
    use. Raises LedgerRefused: OUT_OF_MINUTES when the account has nothing left, MINUTES_IN_USE when
    what is left is held by other live streams."""
    stream_id = stream_id or new_stream_id(now)
    if stream_issued_at(stream_id) is None:
        raise ValueError(f"not a stream id: {stream_id!r}")
    private = prune(current.private, now, policy)
    metadata = msgspec.structs.replace(current, private=private)
    left = entitlement(metadata.public, catalogue).remaining_seconds
    if left <= 0:
        raise LedgerRefused(Refusal.OUT_OF_MINUTES, "no streaming time left on this account")
    allowance = left - live_reserved_seconds(private, now, policy)
    if allowance <= 0:
        raise LedgerRefused(
            Refusal.MINUTES_IN_USE, "the time left is held by another live stream of this account"
        )
    entry = LedgerEntry(seconds=0, reported_at=now, allowance=allowance)
    private = prune(
        msgspec.structs.replace(private, streams={**private.streams, stream_id: entry}), now, policy
    )
    return Reservation(
        metadata=msgspec.structs.replace(metadata, private=private),
        stream_id=stream_id,
        allowance_seconds=allowance,
    )


def restore_reservation(
    current: BillingMetadata,
    stream_id: str,
    entry: LedgerEntry,
    *,
    now: int,
    policy: LedgerPolicy = DEFAULT_POLICY,
) -> BillingMetadata:
    """The metadata with a reservation that `reserve_stream` made against it (or against an earlier state
    of it) put back: the entry as it was granted, unless the ledger already holds the stream. A reservation
    whose ticket can no longer be presented holds nothing and is left out."""
    if stream_id in current.private.streams or not is_live(stream_id, entry, now, policy):
        return current
    streams = {**current.private.streams, stream_id: entry}
    private = prune(msgspec.structs.replace(current.private, streams=streams), now, policy)
    return msgspec.structs.replace(current, private=private)


def _pruned(current: BillingMetadata, now: int, policy: LedgerPolicy) -> BillingMetadata:
    private = prune(current.private, now, policy)
    return current if private is current.private else msgspec.structs.replace(current, private=private)


def _add_seconds(public: PublicBilling, counter: Counter, seconds: int) -> PublicBilling:
    if seconds == 0:
        return public
    if counter is Counter.PERIOD:
        return msgspec.structs.replace(public, seconds_used=public.seconds_used + seconds)
    return msgspec.structs.replace(public, free_seconds_used=public.free_seconds_used + seconds)


__all__ = [
    "DEFAULT_POLICY",
    "Folded",
    "LedgerPolicy",
    "LedgerRefused",
    "Refusal",
    "Reservation",
    "apply_report",
    "available_seconds",
    "claim_stream",
    "is_live",
    "live_reserved_seconds",
    "new_stream_id",
    "prune",
    "reserve_stream",
    "restore_reservation",
    "stream_issued_at",
]
