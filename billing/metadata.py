"""The billing state we keep in Clerk user metadata: the schema, defined once, and its codec.

Stylecast has no database. Everything billing needs lives on the Clerk user, under one `billing` key in
each of the two metadata objects, so other features can keep their own keys next to it:

* `public_metadata.billing` (`PublicBilling`): what the browser may see and what the pages show.
* `private_metadata.billing` (`PrivateBilling`): ChargeBee ids, the latest known state of each of the
  customer's recent subscriptions (from which the public half is derived, see billing/webhooks.py), and
  the usage ledger. Never sent to the browser.

Writes go through Clerk's deep-merge endpoint as a minimal merge patch (`metadata_patch`), so a webhook
that changes the plan never rewrites `seconds_used` that metering may have bumped in between, and keys
we drop are sent as `null`, which is how Clerk deletes them. Metadata written by an older schema is
migrated when it is read (`decode_metadata`); the next write stores the new layout and deletes the keys
only the old one had (`Migrated.retired_private_keys`). See docs/metadata.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from billing.plans import PlanId
from billing.statuses import ENDED_STATUSES, SubscriptionStatus

# 2: one record per subscription (`PrivateBilling.subscriptions`) instead of the single applied one.
SCHEMA_VERSION = 2
NAMESPACE = "billing"
# ChargeBee's resource_version is a millisecond timestamp; a number past 2^53 is not one (and JSON readers
# that use doubles, JavaScript among them, cannot even hold it exactly).
MAX_RESOURCE_VERSION = 2**53
# Private keys of schema 1 that schema 2 replaced by `subscriptions`.
_V1_SUBSCRIPTION_KEYS = (
    "subscription_id",
    "subscription_created_at",
    "subscription_deleted",
    "resource_version",
    "term_start",
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


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
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
    # A worker claimed the stream for one connection (inference/claims.py); every later claim is refused,
    # so one ticket streams once whatever the number of workers.
    claimed: bool = False


class SubscriptionRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The latest known state of one of the customer's ChargeBee subscriptions (billing/webhooks.py).

    Defaults are left out of the stored JSON: several of these live next to the usage ledger in Clerk's
    8 KB, so an ended subscription costs about 80 bytes and a live one about 150.
    """

    # The highest resource_version (ChargeBee, milliseconds) seen for this subscription; orders its events.
    version: int
    created_at: int | None = None
    # ChargeBee's status of the applied state; None once the subscription is deleted.
    status: SubscriptionStatus | None = None
    # subscription_deleted arrived: final, whatever version later events carry.
    deleted: bool = False
    # The Stylecast plan of its plan item; None once it has ended (an ended subscription grants nothing).
    plan: PlanId | None = None
    # ChargeBee's current_term_start / current_term_end; None without a live term.
    term_start: int | None = None
    term_end: int | None = None
    # due_invoices_count > 0 (dunning).
    payment_due: bool = False
    # Seconds streamed in `term_start`'s term while this subscription was the one granting, kept here while
    # another subscription is (public `seconds_used` holds the figure of the one that is).
    seconds_used: int = 0


class PrivateBilling(msgspec.Struct, frozen=True, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    # ChargeBee customer id; Stylecast creates customers with id = Clerk user id.
    customer_id: str | None = None
    # Subscription id -> its latest known state. `PublicBilling` mirrors the one that grants access
    # (billing/webhooks.py decides which); bounded by billing.webhooks.SubscriptionMemory.
    subscriptions: dict[str, SubscriptionRecord] = msgspec.field(default_factory=dict)
    # resource_version below which subscriptions were forgotten: an event of a subscription that is not
    # in `subscriptions` and is older than this changes nothing, so a forgotten one never comes back.
    subscriptions_forgotten_before: int = 0
    # Unix seconds of the last refresh from ChargeBee on a return from the portal (a per-user throttle
    # that every app process sees).
    refreshed_at: int | None = None
    # Usage ledger, stream id -> what has been counted, so repeated worker reports count once.
    streams: dict[str, LedgerEntry] = msgspec.field(default_factory=dict)
    # Issue time (unix seconds) of the newest stream pruned from the ledger: a report for a stream that is
    # not in the ledger and was issued at or before this is refused, so a pruned stream never counts twice.
    streams_pruned_before: int = 0


class BillingMetadata(msgspec.Struct, frozen=True, kw_only=True):
    public: PublicBilling = msgspec.field(default_factory=PublicBilling)
    private: PrivateBilling = msgspec.field(default_factory=PrivateBilling)


def decode_metadata(
    public_metadata: Mapping[str, Any] | None, private_metadata: Mapping[str, Any] | None
) -> BillingMetadata:
    """Read our part of a Clerk user's metadata. Absent metadata is a new user on the Free plan; metadata
    of an older schema is migrated."""
    return read_metadata(public_metadata, private_metadata).metadata


class Migrated(msgspec.Struct, frozen=True, kw_only=True):
    """Metadata as this code reads it, with what its next write must fix in the stored copy."""

    metadata: BillingMetadata
    # schema_version of each stored half (None: absent). A write to a half stored by an older schema
    # stores the current version with it.
    public_version: int | None = None
    private_version: int | None = None
    # Private keys of an older schema that the next private write deletes (a merge patch only removes
    # keys it names).
    retired_private_keys: tuple[str, ...] = ()


def read_metadata(
    public_metadata: Mapping[str, Any] | None, private_metadata: Mapping[str, Any] | None
) -> Migrated:
    public_raw = _namespace(public_metadata)
    private_raw = _namespace(private_metadata)
    public = _decode_part(public_raw, PublicBilling)
    private_version = None if private_raw is None else _version(private_raw)
    if private_raw is not None and private_version == 1:
        private, retired = _private_from_v1(private_raw, public)
    else:
        private, retired = _decode_part(private_raw, PrivateBilling), ()
    return Migrated(
        metadata=BillingMetadata(public=public, private=private),
        public_version=None if public_raw is None else _version(public_raw),
        private_version=private_version,
        retired_private_keys=retired,
    )


_Part = TypeVar("_Part", PublicBilling, PrivateBilling)


def _namespace(metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    raw = (metadata or {}).get(NAMESPACE)
    if raw is not None and not isinstance(raw, Mapping):
        raise MetadataError(f"{NAMESPACE} metadata is not an object")
    return raw


def _version(raw: Mapping[str, Any]) -> int:
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        # Reading it with this code and writing it back could drop fields a newer release relies on.
        raise MetadataError(
            f"{NAMESPACE} metadata has schema_version {version!r}; this code knows {SCHEMA_VERSION}"
        )
    return version


def _decode_part(raw: Mapping[str, Any] | None, kind: type[_Part]) -> _Part:
    if raw is None:
        return kind()
    _version(raw)
    try:
        part = msgspec.convert(dict(raw), type=kind, strict=False)
    except msgspec.ValidationError as exc:
        raise MetadataError(f"{NAMESPACE} metadata does not match the schema: {exc}") from exc
    # Schema 1's public half is schema 2's: only the version number moves.
    return msgspec.structs.replace(part, schema_version=SCHEMA_VERSION)


class _PrivateV1(msgspec.Struct, kw_only=True):
    subscription_id: str | None = None
    subscription_created_at: int | None = None
    subscription_deleted: bool = False
    resource_version: int | None = None
    term_start: int | None = None


def _private_from_v1(raw: Mapping[str, Any], public: PublicBilling) -> tuple[PrivateBilling, tuple[str, ...]]:
    """Schema 1 kept only the applied subscription, with its status, plan and term in the public half;
    that becomes its record. The public half already mirrors it, so it stays as it is."""
    try:
        old = msgspec.convert(dict(raw), type=_PrivateV1, strict=False)
        rest = msgspec.convert(
            {key: value for key, value in raw.items() if key not in _V1_SUBSCRIPTION_KEYS},
            type=PrivateBilling,
            strict=False,
        )
    except msgspec.ValidationError as exc:
        raise MetadataError(f"{NAMESPACE} metadata (schema 1) does not match the schema: {exc}") from exc
    subscriptions: dict[str, SubscriptionRecord] = {}
    if old.subscription_id is not None:
        ended = old.subscription_deleted or public.status in ENDED_STATUSES
        version = old.resource_version or 0
        subscriptions[old.subscription_id] = SubscriptionRecord(
            # A version no ChargeBee subscription can carry (one bogus event froze accounts this way)
            # is dropped, so the subscription's next genuine event applies.
            version=version if 0 <= version <= MAX_RESOURCE_VERSION else 0,
            created_at=old.subscription_created_at,
            status=None if old.subscription_deleted else public.status,
            deleted=old.subscription_deleted,
            plan=None if ended or public.plan is PlanId.FREE else public.plan,
            term_start=None if ended else old.term_start,
            term_end=None if ended else public.period_end,
            payment_due=not ended and public.payment_due,
        )
    private = msgspec.structs.replace(rest, schema_version=SCHEMA_VERSION, subscriptions=subscriptions)
    return private, tuple(key for key in _V1_SUBSCRIPTION_KEYS if key in raw)


def encode_part(part: PublicBilling | PrivateBilling) -> dict[str, Any]:
    """Our part as Clerk stores it: None-valued fields left out (Clerk deletes null keys anyway)."""
    return _drop_none(msgspec.to_builtins(part))


def encode_metadata(metadata: BillingMetadata) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (public_metadata, private_metadata) objects for a user that has nothing else stored."""
    return {NAMESPACE: encode_part(metadata.public)}, {NAMESPACE: encode_part(metadata.private)}


def metadata_patch(
    before: BillingMetadata, after: BillingMetadata, *, stored: Migrated | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Merge patches (RFC 7386, Clerk's deep-merge) taking `before` to `after`; None for an unchanged side.
    `stored` (from `read_metadata`) says what an older schema left behind: a half that is written anyway
    gets the current schema_version, and a migrated private half is written whole (the stored copy does
    not hold what `before` was migrated to) with the keys only the older schema had deleted."""
    public = _merge_patch(encode_part(before.public), encode_part(after.public))
    private = _merge_patch(encode_part(before.private), encode_part(after.private))
    if stored is not None:
        if public and (stored.public_version or SCHEMA_VERSION) < SCHEMA_VERSION:
            public["schema_version"] = SCHEMA_VERSION
        if private and (stored.private_version or SCHEMA_VERSION) < SCHEMA_VERSION:
            private = {**encode_part(after.private), **dict.fromkeys(stored.retired_private_keys)}
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
