"""Applying ChargeBee events to the billing metadata: pure functions, no I/O.

ChargeBee delivers webhooks at least once, in no guaranteed order, and retries for days. So an event is
never applied as a delta: it carries a full subscription snapshot, and the metadata keeps, per
subscription of the customer, the newest snapshot seen (`PrivateBilling.subscriptions`):

* `resource_version` (milliseconds, grows with every change to a subscription) orders one subscription's
  history, so a duplicate or a late `subscription_created` after `subscription_cancelled` changes nothing.
  `subscription_deleted` is final for its subscription whatever version it carries.
* The public half mirrors whichever of those subscriptions grants access (`granting_subscription`): a
  live one before a paused one before an ended one, among live ones the plan with more minutes, then
  the most recently created. A customer who cancels one subscription, buys and cancels a second, and
  then reactivates the first is on the first's plan, whatever order the events arrive in.
* Usage (`seconds_used`) belongs to a subscription's term: it is zeroed when that subscription's term
  changes, and set aside in its record while another subscription is the one granting, so switching
  back and forth neither wipes nor duplicates it.
* The records are bounded (`SubscriptionMemory`): a subscription is forgotten once its newest version is
  older than the customer's `max_subscriptions` most recently changed ones, or `memory_ms` older than
  the newest. `subscriptions_forgotten_before` remembers that line, so a late event of a forgotten
  subscription changes nothing instead of bringing it back.

Every rule above depends only on each subscription's newest snapshot and on that line, which itself is a
function of the newest snapshots; so any delivery order, with any duplicates, ends in the same metadata
(tests/billing/test_webhook_convergence.py checks exactly that).

Events are checked before they are applied (`refusal`): ids in ChargeBee's alphabet, the event's
customer and its subscription's customer the same, and a resource_version that can be a ChargeBee one.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from billing import ids
from billing.metadata import MAX_RESOURCE_VERSION, BillingMetadata, PublicBilling, SubscriptionRecord
from billing.plans import Plan, PlanCatalogue, PlanId
from billing.statuses import ENDED_STATUSES, GRANTING_STATUSES, SubscriptionStatus, precedence

# ChargeBee sends a `_with_backdating` variant when the change is dated in the past (an operator's
# backdated cancellation, say). The snapshot is the subscription as it is now, so it applies like any other.
SUBSCRIPTION_EVENT_TYPES = frozenset(
    {
        "subscription_created",
        "subscription_created_with_backdating",
        "subscription_started",
        "subscription_activated",
        "subscription_activated_with_backdating",
        "subscription_changed",
        "subscription_changed_with_backdating",
        "subscription_renewed",
        "subscription_cancellation_scheduled",
        "subscription_scheduled_cancellation_removed",
        "subscription_cancelled",
        "subscription_canceled_with_backdating",
        "subscription_reactivated",
        "subscription_reactivated_with_backdating",
        "subscription_paused",
        "subscription_resumed",
        "subscription_deleted",
    }
)
PAYMENT_EVENT_TYPES = frozenset({"payment_failed", "payment_succeeded"})
HANDLED_EVENT_TYPES = SUBSCRIPTION_EVENT_TYPES | PAYMENT_EVENT_TYPES

# How far past this machine's clock a resource_version may be (clocks drift; ChargeBee's is not ours).
# A version further out would make every genuine later event of its subscription look stale.
VERSION_LEEWAY_MS = 24 * 3600 * 1000


class SubscriptionMemory(msgspec.Struct, frozen=True, kw_only=True):
    """How many subscriptions of a customer the metadata remembers (see docs/metadata.md)."""

    # The most recently changed subscriptions kept: at most about 1.2 KB next to the ledger's 2.5 KB.
    max_subscriptions: int = 8
    # A subscription whose newest version is this much older than the customer's newest one is forgotten.
    # Longer than any billing term (a live subscription changes at least once a term, when it renews) and
    # far longer than ChargeBee's retries (3 days), so nothing that can still arrive or still grants is lost.
    memory_ms: int = 400 * 24 * 3600 * 1000


DEFAULT_MEMORY = SubscriptionMemory()


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
        """The ChargeBee customer the event is about, which is the Clerk user id. `refusal` makes sure
        the customer and the subscription agree before anything relies on this."""
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


def refusal(event: ChargebeeEvent, now_ms: int) -> str | None:
    """Why a handled event must not be applied, or None. These never get better on a retry."""
    customer, subscription = event.content.customer, event.content.subscription
    if customer is not None and not ids.is_chargebee_id(customer.id):
        return "content.customer.id is not a ChargeBee id"
    if subscription is None:
        return None
    if (reason := subscription_refusal(subscription, now_ms)) is not None:
        return reason
    if customer is not None and customer.id != subscription.customer_id:
        return "content.customer.id and content.subscription.customer_id name different customers"
    return None


def subscription_refusal(subscription: SubscriptionSnapshot, now_ms: int) -> str | None:
    """Why a subscription snapshot (from an event, or read from ChargeBee) must not be applied, or None."""
    if not ids.is_chargebee_id(subscription.id):
        return "subscription.id is not a ChargeBee id"
    if not ids.is_chargebee_id(subscription.customer_id):
        return "subscription.customer_id is not a ChargeBee id"
    version = subscription.resource_version
    if not 0 <= version <= min(MAX_RESOURCE_VERSION, now_ms + VERSION_LEEWAY_MS):
        # One such version would make every genuine later event of the subscription look stale.
        return f"subscription.resource_version {version} is not a ChargeBee version (milliseconds, not ahead)"
    return None


class Outcome(msgspec.Struct, frozen=True):
    """New metadata to write, or None with the reason nothing changes."""

    metadata: BillingMetadata | None
    reason: str

    @property
    def changed(self) -> bool:
        return self.metadata is not None


def apply_event(
    current: BillingMetadata,
    event: ChargebeeEvent,
    catalogue: PlanCatalogue,
    memory: SubscriptionMemory = DEFAULT_MEMORY,
) -> Outcome:
    if not event.handled:
        return Outcome(None, f"{event.event_type} does not affect billing")
    if event.content.subscription is None:
        return Outcome(None, f"{event.event_type} carries no subscription")
    return apply_subscription(
        current,
        event.content.subscription,
        catalogue,
        deleted=event.event_type == "subscription_deleted",
        memory=memory,
    )


def apply_subscriptions(
    current: BillingMetadata,
    subscriptions: Iterable[SubscriptionSnapshot],
    catalogue: PlanCatalogue,
    memory: SubscriptionMemory = DEFAULT_MEMORY,
) -> Outcome:
    """Several snapshots (the customer's subscriptions as ChargeBee lists them) applied as one change."""
    metadata, reasons = current, []
    for subscription in subscriptions:
        outcome = apply_subscription(metadata, subscription, catalogue, memory=memory)
        reasons.append(f"{subscription.id}: {outcome.reason}")
        metadata = outcome.metadata or metadata
    reason = "; ".join(reasons) or "no subscriptions"
    return Outcome(None if metadata == current else metadata, reason)


def apply_subscription(
    current: BillingMetadata,
    subscription: SubscriptionSnapshot,
    catalogue: PlanCatalogue,
    *,
    deleted: bool = False,
    memory: SubscriptionMemory = DEFAULT_MEMORY,
) -> Outcome:
    """Fold a subscription snapshot (from an event, or read back from ChargeBee) into the metadata."""
    stored = current.private
    try:
        status = SubscriptionStatus(subscription.status)
    except ValueError:
        return Outcome(None, f"unknown subscription status {subscription.status!r}")
    ended = deleted or status in ENDED_STATUSES
    plan: Plan | None = None
    if not ended:
        plan = _subscribed_plan(subscription, catalogue)
        if plan is None:
            # Not a Stylecast subscription (the site may sell other products): it is not ours to track.
            items = [item.item_price_id for item in subscription.subscription_items]
            return Outcome(None, f"no Stylecast plan among the subscription's item prices {items}")

    version = subscription.resource_version
    existing = stored.subscriptions.get(subscription.id)
    if existing is None:
        if version < stored.subscriptions_forgotten_before:
            return Outcome(None, "older than the subscription history this account keeps")
        applies = True
    elif existing.deleted:
        applies = False
    else:
        applies = deleted or version > existing.version
    if existing is not None and not applies and version <= existing.version:
        return Outcome(None, "not newer than the stored state of this subscription")

    records = dict(stored.subscriptions)
    # The counter in the public half belongs to the subscription that grants now; park it in its record
    # so the switch below (if any) moves it along with that subscription's term.
    granting_before = granting_subscription(records, catalogue)
    if granting_before is not None:
        records[granting_before] = msgspec.structs.replace(
            records[granting_before], seconds_used=current.public.seconds_used
        )
    previous = records.get(subscription.id)
    if not applies:
        # A later event of a deleted subscription: only its version moves, so the memory bound below
        # sees the same newest version in any delivery order.
        assert previous is not None
        records[subscription.id] = msgspec.structs.replace(previous, version=version)
    else:
        term_start = None if ended else subscription.current_term_start
        same_term = previous is not None and previous.term_start == term_start and not ended
        records[subscription.id] = SubscriptionRecord(
            version=max(version, previous.version) if previous is not None else version,
            created_at=subscription.created_at,
            status=None if deleted else status,
            deleted=deleted,
            plan=None if plan is None else plan.id,
            term_start=term_start,
            term_end=None if ended else subscription.current_term_end,
            payment_due=not ended and subscription.due_invoices_count > 0,
            seconds_used=previous.seconds_used if same_term and previous is not None else 0,
        )

    records, horizon = _remember(records, stored.subscriptions_forgotten_before, memory)
    granting = granting_subscription(records, catalogue)
    seconds_used = 0
    if granting is not None:
        seconds_used = records[granting].seconds_used
        records[granting] = msgspec.structs.replace(records[granting], seconds_used=0)
    private = msgspec.structs.replace(
        stored,
        customer_id=subscription.customer_id,
        subscriptions=records,
        subscriptions_forgotten_before=horizon,
    )
    public = _mirror(current.public, None if granting is None else records[granting], seconds_used)
    updated = BillingMetadata(public=public, private=private)
    if updated == current:
        return Outcome(None, "nothing changes")
    return Outcome(updated, "applied" if applies else "recorded the version of a deleted subscription")


def granting_subscription(records: dict[str, SubscriptionRecord], catalogue: PlanCatalogue) -> str | None:
    """The subscription the account's plan follows: one that grants (best plan, then newest) before one
    that may bill again (paused, future) before one that ended; None without any."""

    def rank(item: tuple[str, SubscriptionRecord]) -> tuple[int, int, int, str]:
        subscription_id, record = item
        grants = record.status in GRANTING_STATUSES
        seconds = catalogue.get(record.plan).seconds if grants and record.plan is not None else 0
        return precedence(record.status), seconds, record.created_at or 0, subscription_id

    if not records:
        return None
    return max(records.items(), key=rank)[0]


def _remember(
    records: dict[str, SubscriptionRecord], horizon: int, memory: SubscriptionMemory
) -> tuple[dict[str, SubscriptionRecord], int]:
    """Drop what falls behind the memory bound; the line only ever moves forward."""
    versions = sorted((record.version for record in records.values()), reverse=True)
    if versions:
        horizon = max(horizon, versions[0] - memory.memory_ms)
    if len(versions) >= memory.max_subscriptions:
        horizon = max(horizon, versions[memory.max_subscriptions - 1])
    kept = {key: record for key, record in records.items() if record.version >= horizon}
    return kept, horizon


def _mirror(public: PublicBilling, record: SubscriptionRecord | None, seconds_used: int) -> PublicBilling:
    if record is None:
        return msgspec.structs.replace(
            public,
            plan=PlanId.FREE,
            status=None,
            payment_due=False,
            seconds_used=seconds_used,
            period_start=None,
            period_end=None,
        )
    return msgspec.structs.replace(
        public,
        plan=record.plan or PlanId.FREE,
        status=record.status,
        payment_due=record.payment_due,
        seconds_used=seconds_used,
        period_start=record.term_start,
        period_end=record.term_end,
    )


def _subscribed_plan(subscription: SubscriptionSnapshot, catalogue: PlanCatalogue) -> Plan | None:
    for item in subscription.subscription_items:
        if item.item_type == "plan":
            plan = catalogue.by_item_price(item.item_price_id)
            if plan is not None and plan.paid:
                return plan
    return None


__all__ = [
    "DEFAULT_MEMORY",
    "HANDLED_EVENT_TYPES",
    "ChargebeeEvent",
    "MalformedEvent",
    "Outcome",
    "SubscriptionMemory",
    "SubscriptionSnapshot",
    "apply_event",
    "apply_subscription",
    "apply_subscriptions",
    "granting_subscription",
    "parse_event",
    "refusal",
    "subscription_refusal",
]
