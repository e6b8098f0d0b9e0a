"""Applying ChargeBee events to the billing metadata: pure functions, no I/O.

ChargeBee delivers webhooks at least once, in no guaranteed order, and retries for days. So an event is
never applied as a delta; it carries a full subscription snapshot, and the metadata mirrors the newest
snapshot seen, ordered by this key:

    (subscription.created_at, subscription.id, deleted?, subscription.resource_version)

* `resource_version` (milliseconds, grows with every change to a subscription) orders one subscription's
  history, so a duplicate or a late `subscription_created` after `subscription_cancelled` changes nothing.
* Across subscriptions of one customer (cancel, then subscribe again later) the newest subscription wins;
  events of an older one are ignored.
* `subscription_deleted` is final for its subscription whatever version it carries.

Usage (`seconds_used`) is zeroed only when the applied snapshot's term differs from the stored one, so a
replayed renewal cannot wipe usage twice. Because the result depends only on the newest snapshot and on
whether the term moved, any delivery order, with any duplicates, ends in the same metadata
(tests/billing/test_webhook_convergence.py checks exactly that).
"""

from __future__ import annotations

from typing import Any

import msgspec

from billing.metadata import BillingMetadata, SubscriptionStatus
from billing.plans import Plan, PlanCatalogue, PlanId

SUBSCRIPTION_EVENT_TYPES = frozenset(
    {
        "subscription_created",
        "subscription_started",
        "subscription_activated",
        "subscription_changed",
        "subscription_renewed",
        "subscription_cancellation_scheduled",
        "subscription_scheduled_cancellation_removed",
        "subscription_cancelled",
        "subscription_reactivated",
        "subscription_paused",
        "subscription_resumed",
        "subscription_deleted",
    }
)
PAYMENT_EVENT_TYPES = frozenset({"payment_failed", "payment_succeeded"})
HANDLED_EVENT_TYPES = SUBSCRIPTION_EVENT_TYPES | PAYMENT_EVENT_TYPES

# Statuses after which the subscription no longer exists for billing purposes.
_ENDED_STATUSES = frozenset({SubscriptionStatus.CANCELLED, SubscriptionStatus.TRANSFERRED})


class MalformedEvent(ValueError):
    """The body is not a ChargeBee event this code can read."""


class SubscriptionItemSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    item_price_id: str
    item_type: str = "plan"


class SubscriptionSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of ChargeBee's subscription resource that billing reads (it has many more)."""

    id: str
    customer_id: str
    status: str
    resource_version: int
    created_at: int | None = None
    current_term_start: int | None = None
    current_term_end: int | None = None
    subscription_items: list[SubscriptionItemSnapshot] = msgspec.field(default_factory=list)
    due_invoices_count: int = 0


class CustomerSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    email: str | None = None


class EventContent(msgspec.Struct, frozen=True, kw_only=True):
    subscription: SubscriptionSnapshot | None = None
    customer: CustomerSnapshot | None = None


class ChargebeeEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    event_type: str
    occurred_at: int
    api_version: str | None = None
    content: EventContent = msgspec.field(default_factory=EventContent)

    @property
    def handled(self) -> bool:
        return self.event_type in HANDLED_EVENT_TYPES

    @property
    def customer_id(self) -> str | None:
        """The ChargeBee customer the event is about, which is the Clerk user id."""
        if self.content.customer is not None:
            return self.content.customer.id
        if self.content.subscription is not None:
            return self.content.subscription.customer_id
        return None


class _Envelope(msgspec.Struct, kw_only=True):
    id: str
    event_type: str
    occurred_at: int
    api_version: str | None = None
    content: msgspec.Raw = msgspec.Raw(b"{}")


def parse_event(body: bytes) -> ChargebeeEvent:
    """Decode a webhook body. Content is only validated for event types billing handles, so a new
    ChargeBee event type with an unfamiliar shape is still acknowledged rather than retried forever."""
    try:
        envelope = msgspec.json.decode(body, type=_Envelope)
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"not a ChargeBee event: {exc}") from exc
    content = EventContent()
    if envelope.event_type in HANDLED_EVENT_TYPES:
        try:
            content = msgspec.json.decode(envelope.content, type=EventContent)
        except msgspec.DecodeError as exc:
            raise MalformedEvent(f"{envelope.event_type} content is malformed: {exc}") from exc
    return ChargebeeEvent(
        id=envelope.id,
        event_type=envelope.event_type,
        occurred_at=envelope.occurred_at,
        api_version=envelope.api_version,
        content=content,
    )


class Outcome(msgspec.Struct, frozen=True):
    """New metadata to write, or None with the reason nothing changes."""

    metadata: BillingMetadata | None
    reason: str

    @property
    def changed(self) -> bool:
        return self.metadata is not None


def apply_event(current: BillingMetadata, event: ChargebeeEvent, catalogue: PlanCatalogue) -> Outcome:
    if not event.handled:
        return Outcome(None, f"{event.event_type} does not affect billing")
    if event.content.subscription is None:
        return Outcome(None, f"{event.event_type} carries no subscription")
    return apply_subscription(
        current,
        event.content.subscription,
        catalogue,
        deleted=event.event_type == "subscription_deleted",
    )


def apply_subscription(
    current: BillingMetadata,
    subscription: SubscriptionSnapshot,
    catalogue: PlanCatalogue,
    *,
    deleted: bool = False,
) -> Outcome:
    """Mirror a subscription snapshot (from an event, or read back after checkout) into the metadata."""
    stored = current.private
    incoming_key = _order_key(
        subscription.created_at, subscription.id, deleted, subscription.resource_version
    )
    if stored.subscription_id is not None:
        stored_key = _order_key(
            stored.subscription_created_at,
            stored.subscription_id,
            stored.subscription_deleted,
            stored.resource_version,
        )
        if incoming_key <= stored_key:
            return Outcome(None, "not newer than the applied subscription state")

    try:
        status = SubscriptionStatus(subscription.status)
    except ValueError:
        return Outcome(None, f"unknown subscription status {subscription.status!r}")

    ended = deleted or status in _ENDED_STATUSES
    if ended:
        plan_id = PlanId.FREE
        term_start = term_end = None
    else:
        plan = _subscribed_plan(subscription, catalogue)
        if plan is None:
            items = [item.item_price_id for item in subscription.subscription_items]
            return Outcome(None, f"no Stylecast plan among the subscription's item prices {items}")
        plan_id = plan.id
        term_start, term_end = subscription.current_term_start, subscription.current_term_end

    # A different subscription or a different term is a new billing period.
    new_period = subscription.id != stored.subscription_id or term_start != stored.term_start
    public = msgspec.structs.replace(
        current.public,
        plan=plan_id,
        status=None if deleted else status,
        payment_due=not ended and subscription.due_invoices_count > 0,
        seconds_used=0 if new_period else current.public.seconds_used,
        period_start=term_start,
        period_end=term_end,
    )
    private = msgspec.structs.replace(
        stored,
        customer_id=subscription.customer_id,
        subscription_id=subscription.id,
        subscription_created_at=subscription.created_at,
        subscription_deleted=deleted,
        resource_version=subscription.resource_version,
        term_start=term_start,
    )
    return Outcome(BillingMetadata(public=public, private=private), "applied")


def _order_key(
    created_at: int | None, subscription_id: str, deleted: bool, version: int | None
) -> tuple[Any, ...]:
    return (created_at or 0, subscription_id, deleted, version or 0)


def _subscribed_plan(subscription: SubscriptionSnapshot, catalogue: PlanCatalogue) -> Plan | None:
    for item in subscription.subscription_items:
        if item.item_type == "plan":
            plan = catalogue.by_item_price(item.item_price_id)
            if plan is not None and plan.paid:
                return plan
    return None


__all__ = [
    "HANDLED_EVENT_TYPES",
    "ChargebeeEvent",
    "MalformedEvent",
    "Outcome",
    "SubscriptionSnapshot",
    "apply_event",
    "apply_subscription",
    "parse_event",
]
