"""The billing state we keep in Clerk user metadata: the schema, defined once, and its codec.

Stylecast has no database. Everything billing needs lives on the Clerk user, under one `billing` key in
each of the two metadata objects, so other features can keep their own keys next to it:

* `public_metadata.billing` (`PublicBilling`): what the browser may see and what the pages show.
* `private_metadata.billing` (`PrivateBilling`): ChargeBee ids, the ordering bookkeeping that makes
  webhooks idempotent, and the usage ledger. Never sent to the browser.

Writes go through Clerk's deep-merge endpoint as a minimal merge patch (`metadata_patch`), so a webhook
that changes the plan never rewrites `seconds_used` that metering may have bumped in between, and keys
we drop are sent as `null`, which is how Clerk deletes them. See docs/metadata.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

import msgspec

from billing.plans import PlanId

SCHEMA_VERSION = 1
NAMESPACE = "billing"


class SubscriptionStatus(StrEnum):
    """ChargeBee's subscription statuses, as they arrive in webhooks."""

    FUTURE = "future"
    IN_TRIAL = "in_trial"
    ACTIVE = "active"
    NON_RENEWING = "non_renewing"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    TRANSFERRED = "transferred"


# A subscription in one of these states grants its plan's allowance. `non_renewing` is paid up to the
# end of the term; `in_trial` is a deliberate trial. Paused, future and ended subscriptions do not.
GRANTING_STATUSES = frozenset(
    {SubscriptionStatus.IN_TRIAL, SubscriptionStatus.ACTIVE, SubscriptionStatus.NON_RENEWING}
)


class MetadataError(Exception):
    """Stored metadata that this code cannot read safely (corrupt, or written by a newer schema)."""


class PublicBilling(msgspec.Struct, frozen=True, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    # The plan of the account's current subscription; Free when there is none or it has ended.
    plan: PlanId = PlanId.FREE
    # The subscription's ChargeBee status; None when the account never subscribed or it was deleted.
    status: SubscriptionStatus | None = None
    # ChargeBee has unpaid invoices for the subscription (dunning); it keeps granting until it cancels.
    payment_due: bool = False
    # Streaming seconds used in the current billing period of a paid plan; zeroed when the term changes.
    seconds_used: int = 0
    # Streaming seconds used on the Free plan over the account's lifetime; never reset.
    free_seconds_used: int = 0
    # The current billing term, unix seconds (ChargeBee's current_term_start / current_term_end).
    period_start: int | None = None
    period_end: int | None = None


class StreamUsage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One stream's entry in the usage ledger (owned by metering: billing/ledger.py; docs/metering.md).

    The stream's issue time is part of its id, so it is not stored again. Defaults are left out of the
    stored JSON: the ledger has to fit next to everything else in Clerk's 8 KB of metadata.
    """

    # Cumulative billable seconds of this stream already folded into the counters above.
    seconds: int
    # Unix seconds (app clock) of the last sign of life: the ticket's issue, or the last report folded in.
    reported_at: int
    # Billable seconds the stream's ticket granted, reserved when it was issued. A stream is never billed
    # more than this.
    allowance: int
    # The worker sent the stream's final report: it is closed for good and reserves nothing.
    final: bool = False


class PrivateBilling(msgspec.Struct, frozen=True, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    # ChargeBee customer id; Stylecast creates customers with id = Clerk user id.
    customer_id: str | None = None
    # The subscription whose state `PublicBilling` mirrors, and the position of the last applied
    # change in its history. Together they order webhooks: see billing/webhooks.py.
    subscription_id: str | None = None
    subscription_created_at: int | None = None
    subscription_deleted: bool = False
    resource_version: int | None = None
    # ChargeBee's current_term_start of the applied snapshot: usage resets only when this changes.
    term_start: int | None = None
    # Usage ledger, stream id -> what has been counted, so repeated worker reports count once.
    streams: dict[str, StreamUsage] = msgspec.field(default_factory=dict)
    # Issue time (unix seconds) of the newest stream pruned from the ledger: a report for a stream that is
    # not in the ledger and was issued at or before this is refused, so a pruned stream never counts twice.
    streams_pruned_before: int = 0


class BillingMetadata(msgspec.Struct, frozen=True, kw_only=True):
    public: PublicBilling = msgspec.field(default_factory=PublicBilling)
    private: PrivateBilling = msgspec.field(default_factory=PrivateBilling)


def decode_metadata(
    public_metadata: Mapping[str, Any] | None, private_metadata: Mapping[str, Any] | None
) -> BillingMetadata:
    """Read our part of a Clerk user's metadata. Absent metadata is a new user on the Free plan."""
    return BillingMetadata(
        public=_decode_part(public_metadata, PublicBilling),
        private=_decode_part(private_metadata, PrivateBilling),
    )


_Part = TypeVar("_Part", PublicBilling, PrivateBilling)


def _decode_part(metadata: Mapping[str, Any] | None, kind: type[_Part]) -> _Part:
    raw = (metadata or {}).get(NAMESPACE)
    if raw is None:
        return kind()
    if not isinstance(raw, Mapping):
        raise MetadataError(f"{NAMESPACE} metadata is not an object")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        # Reading it with this code and writing it back could drop fields a newer release relies on.
        raise MetadataError(
            f"{NAMESPACE} metadata has schema_version {version!r}; this code knows {SCHEMA_VERSION}"
        )
    try:
        return msgspec.convert(dict(raw), type=kind, strict=False)
    except msgspec.ValidationError as exc:
        raise MetadataError(f"{NAMESPACE} metadata does not match the schema: {exc}") from exc


def encode_part(part: PublicBilling | PrivateBilling) -> dict[str, Any]:
    """Our part as Clerk stores it: None-valued fields left out (Clerk deletes null keys anyway)."""
    return _drop_none(msgspec.to_builtins(part))


def encode_metadata(metadata: BillingMetadata) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (public_metadata, private_metadata) objects for a user that has nothing else stored."""
    return {NAMESPACE: encode_part(metadata.public)}, {NAMESPACE: encode_part(metadata.private)}


def metadata_patch(
    before: BillingMetadata, after: BillingMetadata
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Merge patches (RFC 7386, Clerk's deep-merge) taking `before` to `after`; None for an unchanged side."""
    public = _merge_patch(encode_part(before.public), encode_part(after.public))
    private = _merge_patch(encode_part(before.private), encode_part(after.private))
    return ({NAMESPACE: public} if public else None), ({NAMESPACE: private} if private else None)


def _merge_patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {key: None for key in before.keys() - after.keys()}
    for key, value in after.items():
        old = before.get(key, _MISSING)
        if old == value:
            continue
        if isinstance(old, dict) and isinstance(value, dict):
            patch[key] = _merge_patch(old, value)
        else:
            patch[key] = value
    return patch


_MISSING = object()


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_none(item) for key, item in value.items() if item is not None}
    return value
