"""Several subscriptions per customer, their bounded memory, the schema migration, and the checks an event
passes before it is applied (billing/webhooks.py, billing/metadata.py)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import msgspec
from chargebee.models.enums import EventType
from hypothesis import given, settings
from hypothesis import strategies as st

from app.wiring import plan_catalogue
from billing.entitlement import Counter, entitlement
from billing.ledger import DEFAULT_POLICY
from billing.metadata import (
    BillingMetadata,
    LedgerEntry,
    PublicBilling,
    decode_metadata,
    encode_metadata,
    metadata_patch,
    read_metadata,
)
from billing.webhooks import (
    DEFAULT_MEMORY,
    HANDLED_EVENT_TYPES,
    ChargebeeEvent,
    SubscriptionMemory,
    apply_event,
    parse_event,
    refusal,
)
from tests.billing.conftest import sandbox_settings
from tests.billing.lifecycle import DAY, Lifecycle

CATALOGUE = plan_catalogue(sandbox_settings(Path(tempfile.mkdtemp(prefix="stylecast-plans-"))))
PRO, ULTRA = (plan.item_price_id or "" for plan in CATALOGUE.paid)
CLERK_METADATA_LIMIT = 8 * 1024


def deliver(
    metadata: BillingMetadata, events: list[ChargebeeEvent], memory: SubscriptionMemory = DEFAULT_MEMORY
) -> BillingMetadata:
    for item in events:
        metadata = apply_event(metadata, item, CATALOGUE, memory).metadata or metadata
    return metadata


def reactivated_after_a_second_subscription() -> Lifecycle:
    """A customer who cancels Pro, buys Ultra and cancels it, then reactivates the Pro one."""
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    life.act("cancel", 0)
    life.act("subscribe_again")
    life.act("cancel", 1)
    life.act("reactivate", 0)
    return life


@settings(max_examples=200, deadline=None)
@given(order=st.data())
def test_reactivating_an_older_subscription_credits_it_in_any_order(order: st.DataObject) -> None:
    life = reactivated_after_a_second_subscription()
    assert [sub["status"] for sub in life.subscriptions] == ["active", "cancelled"]
    delivery = order.draw(st.permutations(life.events))
    metadata = deliver(BillingMetadata(public=PublicBilling(free_seconds_used=60)), delivery)
    view = entitlement(metadata.public, CATALOGUE)
    assert (view.plan.name, view.counter, view.remaining_seconds) == ("Pro", Counter.PERIOD, 30 * 60)
    assert (metadata.public.status, metadata.public.period_start) == (
        "active",
        life.subscriptions[0]["current_term_start"],
    )


def test_usage_stays_with_its_subscription_while_another_one_grants() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    metadata = deliver(BillingMetadata(), life.events)
    public = msgspec.structs.replace(metadata.public, seconds_used=600)
    metadata = msgspec.structs.replace(metadata, public=public)

    # A second, better subscription made by hand in ChargeBee takes over with its own, unused term...
    life.act("subscribe_by_hand")
    metadata = deliver(metadata, life.events[-2:])
    view = entitlement(metadata.public, CATALOGUE)
    assert (view.plan.name, view.remaining_seconds) == ("Ultra", 60 * 60)
    # ...and when it is cancelled, the Pro term is where it was: not a fresh 30 minutes.
    life.act("cancel", 1)
    metadata = deliver(metadata, life.events[-1:])
    view = entitlement(metadata.public, CATALOGUE)
    assert (view.plan.name, view.remaining_seconds) == ("Pro", 20 * 60)


def test_a_forgotten_subscription_does_not_come_back_with_a_late_event() -> None:
    memory = SubscriptionMemory(max_subscriptions=2, memory_ms=400 * DAY * 1000)
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA), step=DAY)
    life.start(PRO)
    created_first = life.events[0]
    life.act("cancel", 0)
    for _ in range(2):
        life.act("subscribe_again")
        life.act("cancel")
    metadata = deliver(BillingMetadata(), life.events, memory)
    assert "sub_1" not in metadata.private.subscriptions
    assert len(metadata.private.subscriptions) == 2
    # ChargeBee (or an operator's resend) delivers the first subscription's creation once more.
    outcome = apply_event(metadata, created_first, CATALOGUE, memory)
    assert not outcome.changed
    assert "older than the subscription history" in outcome.reason
    assert entitlement(metadata.public, CATALOGUE).plan.name == "Free"


def test_a_customer_with_many_subscriptions_fits_in_clerk_metadata() -> None:
    life = Lifecycle(customer_id="user_2abcdefghijklmnopqrstuvwxyz", item_prices=(PRO, ULTRA), step=DAY)
    life.start(PRO)
    for _ in range(30):
        life.act("cancel")
        life.act("subscribe_again")
    life.act("renew_payment_fails")
    metadata = deliver(BillingMetadata(), life.events)
    assert len(life.subscriptions) == 31
    assert len(metadata.private.subscriptions) == 8
    assert entitlement(metadata.public, CATALOGUE).plan.name in ("Pro", "Ultra")
    # Next to a full usage ledger (the ledger keeps at most this many streams).
    streams = {
        f"st_{1_760_000_000 + index}_0a1b2c3d4e5f": LedgerEntry(
            seconds=3599, reported_at=1_760_003_600, allowance=3600, final=True
        )
        for index in range(DEFAULT_POLICY.max_entries)
    }
    private = msgspec.structs.replace(metadata.private, streams=streams, refreshed_at=1_760_000_000)
    public, private_json = encode_metadata(msgspec.structs.replace(metadata, private=private))
    total = len(json.dumps(public, separators=(",", ":"))) + len(
        json.dumps(private_json, separators=(",", ":"))
    )
    assert total < CLERK_METADATA_LIMIT / 2, total


def schema_1(resource_version: int) -> tuple[dict[str, object], dict[str, object]]:
    """An account as the previous release stored it: Pro, active, 10 minutes used."""
    public = {
        "billing": {
            "schema_version": 1,
            "plan": "pro",
            "status": "active",
            "seconds_used": 600,
            "free_seconds_used": 60,
            "period_start": 1_760_000_000,
            "period_end": 1_762_592_000,
        }
    }
    private = {
        "billing": {
            "schema_version": 1,
            "customer_id": "user_1",
            "subscription_id": "sub_1",
            "subscription_created_at": 1_760_000_000,
            "subscription_deleted": False,
            "resource_version": resource_version,
            "term_start": 1_760_000_000,
            "streams": {
                "st_1760000100_0a1b2c3d4e5f": {"seconds": 42, "reported_at": 1_760_000_200, "allowance": 1800}
            },
            "streams_pruned_before": 7,
        }
    }
    return public, private


def test_schema_1_metadata_reads_as_the_same_account_and_its_next_write_migrates_it() -> None:
    public, private = schema_1(1_760_000_000_000)
    stored = read_metadata(public, private)
    metadata = stored.metadata
    view = entitlement(metadata.public, CATALOGUE)
    assert (view.plan.name, view.remaining_seconds) == ("Pro", 20 * 60)
    record = metadata.private.subscriptions["sub_1"]
    assert (record.version, record.status, record.plan, record.term_end) == (
        1_760_000_000_000,
        "active",
        "pro",
        1_762_592_000,
    )
    assert metadata.private.streams["st_1760000100_0a1b2c3d4e5f"].seconds == 42
    assert metadata.private.streams_pruned_before == 7

    # The subscription renews: the write stores schema 2 and deletes schema 1's keys.
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA), now=1_760_000_000)
    life.start(PRO)
    life.act("renew")
    renewed = deliver(metadata, life.events[-2:])
    public_patch, private_patch = metadata_patch(metadata, renewed, stored=stored)
    assert public_patch is not None
    assert private_patch is not None
    assert public_patch["billing"]["schema_version"] == 2
    assert private_patch["billing"]["schema_version"] == 2
    for key in (
        "subscription_id",
        "subscription_created_at",
        "subscription_deleted",
        "resource_version",
        "term_start",
    ):
        assert private_patch["billing"][key] is None
    written = decode_metadata(_merge(public, public_patch), _merge(private, private_patch))
    assert written == renewed
    assert entitlement(written.public, CATALOGUE).remaining_seconds == 30 * 60


def test_a_frozen_schema_1_account_thaws_on_its_next_genuine_event() -> None:
    public, private = schema_1(2**62)
    metadata = decode_metadata(public, private)
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA), now=1_760_000_000)
    life.start(PRO)
    life.act("cancel")
    cancelled = deliver(metadata, life.events[-1:])
    assert (cancelled.public.plan, cancelled.public.status) == ("free", "cancelled")


def _merge(target: dict[str, object], patch: dict[str, object]) -> dict[str, object]:
    """RFC 7386, as Clerk's deep-merge applies a patch."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)  # type: ignore[arg-type]
        else:
            merged[key] = value
    return merged


def event(
    subscription: dict[str, object], customer_id: str, event_type: str = "subscription_created"
) -> bytes:
    return json.dumps(
        {
            "id": "ev_check",
            "occurred_at": 1_760_000_000,
            "event_type": event_type,
            "content": {"subscription": subscription, "customer": {"id": customer_id}},
        }
    ).encode()


def subscription(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "sub_1",
        "customer_id": "user_1",
        "status": "active",
        "resource_version": 1_760_000_000_000,
        "subscription_items": [{"item_price_id": PRO, "item_type": "plan"}],
    }
    return {**base, **changes}


def test_events_that_can_never_apply_are_refused() -> None:
    now_ms = int(time.time() * 1000)
    assert refusal(parse_event(event(subscription(), "user_1")), now_ms) is None
    refused = {
        "customer disagrees": event(subscription(customer_id="user_2"), "user_1"),
        "customer path": event(subscription(customer_id="../users"), "../users"),
        "subscription path": event(subscription(id="../../customers"), "user_1"),
        "far future": event(subscription(resource_version=now_ms + 2 * DAY * 1000), "user_1"),
        "2^62": event(subscription(resource_version=2**62), "user_1"),
        "negative": event(subscription(resource_version=-1), "user_1"),
    }
    for name, body in refused.items():
        assert refusal(parse_event(body), now_ms) is not None, name
    # A clock a few hours apart is not a reason.
    assert (
        refusal(parse_event(event(subscription(resource_version=now_ms + 3_600_000), "user_1")), now_ms)
        is None
    )


def test_backdated_events_are_chargebee_event_types_and_apply() -> None:
    chargebee_types = {member.value for member in EventType}
    assert chargebee_types >= HANDLED_EVENT_TYPES
    backdated = {
        name for name in chargebee_types if name.startswith("subscription_") and "backdating" in name
    }
    assert backdated <= HANDLED_EVENT_TYPES

    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    life.act("cancel_backdated")
    assert life.events[-1].event_type == "subscription_canceled_with_backdating"
    metadata = deliver(BillingMetadata(), life.events)
    assert (metadata.public.plan, metadata.public.status) == ("free", "cancelled")
    life.act("reactivate_backdated")
    metadata = deliver(metadata, life.events[-2:])
    assert (metadata.public.plan, metadata.public.status) == ("pro", "active")
    assert metadata.public.period_start == life.subscription["current_term_start"]
