"""Webhooks arrive at least once and in any order; the metadata must not care."""

from __future__ import annotations

import tempfile
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from app.wiring import plan_catalogue
from billing.entitlement import Counter, entitlement
from billing.metadata import BillingMetadata, PublicBilling
from billing.plans import PlanCatalogue
from billing.webhooks import (
    DEFAULT_MEMORY,
    ChargebeeEvent,
    SubscriptionMemory,
    apply_event,
    granting_subscription,
)
from tests.billing.conftest import sandbox_settings
from tests.billing.lifecycle import ACTIONS, DAY, Lifecycle

CATALOGUE = plan_catalogue(sandbox_settings(Path(tempfile.mkdtemp(prefix="stylecast-plans-"))))
PRO, ULTRA = (plan.item_price_id or "" for plan in CATALOGUE.paid)


def deliver(
    metadata: BillingMetadata, events: list[ChargebeeEvent], memory: SubscriptionMemory = DEFAULT_MEMORY
) -> BillingMetadata:
    for event in events:
        outcome = apply_event(metadata, event, CATALOGUE, memory)
        if outcome.metadata is not None:
            metadata = outcome.metadata
    return metadata


def stream(metadata: BillingMetadata, seconds: int) -> BillingMetadata:
    """Usage as the ledger records it: on whichever counter the entitlement says."""
    counter = entitlement(metadata.public, CATALOGUE).counter
    current = getattr(metadata.public, counter.value)
    public = msgspec.structs.replace(metadata.public, **{counter.value: current + seconds})
    return msgspec.structs.replace(metadata, public=public)


def history(actions: list[tuple[str, int]], step: int = 3600) -> Lifecycle:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA), step=step)
    life.start(PRO)
    for action, target in actions:
        life.act(action, target)
    return life


ACTION_LISTS = st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 3)), max_size=16)
# Days apart and only three remembered: subscriptions get forgotten, by number and by age.
TIGHT_MEMORY = SubscriptionMemory(max_subscriptions=3, memory_ms=20 * DAY * 1000)


def check_any_order_converges(
    events: list[ChargebeeEvent],
    data: st.DataObject,
    free_used: int,
    used: int,
    memory: SubscriptionMemory = DEFAULT_MEMORY,
) -> BillingMetadata:
    # Some history is already applied in order and the user streamed since; the rest is in flight.
    applied = data.draw(st.integers(0, len(events)), label="applied in order before")
    fresh = BillingMetadata(public=PublicBilling(free_seconds_used=free_used))
    start = stream(deliver(fresh, events[:applied], memory), used)

    in_order = deliver(start, events[applied:], memory)
    shuffled = data.draw(st.permutations(events), label="delivery order")
    replays = data.draw(st.lists(st.sampled_from(events), max_size=len(events)), label="replays")
    positions = data.draw(st.lists(st.integers(0, len(events)), min_size=len(replays), max_size=len(replays)))
    delivery = list(shuffled)
    for position, replay in zip(positions, replays, strict=True):
        delivery.insert(position, replay)

    assert deliver(start, delivery, memory) == in_order
    # Replaying everything once more changes nothing at all.
    assert deliver(in_order, events, memory) == in_order
    return in_order


@settings(max_examples=300, deadline=None)
@given(actions=ACTION_LISTS, free_used=st.integers(0, 60), used=st.integers(0, 1800), data=st.data())
def test_any_order_with_duplicates_converges_to_in_order_result(
    actions: list[tuple[str, int]], free_used: int, used: int, data: st.DataObject
) -> None:
    life = history(actions)
    final = check_any_order_converges(life.events, data, free_used, used)
    # What the user may stream follows whichever subscription is live, not the newest one.
    live = [
        sub
        for sub in life.subscriptions
        if sub["status"] in ("active", "non_renewing") and sub["id"] not in life.deleted
    ]
    view = entitlement(final.public, CATALOGUE)
    if live:
        best = max(
            live,
            key=lambda sub: CATALOGUE.by_item_price(sub["subscription_items"][0]["item_price_id"]).seconds,
        )
        plan = CATALOGUE.by_item_price(best["subscription_items"][0]["item_price_id"])
        assert (view.plan.id, view.counter) == (plan.id, Counter.PERIOD)
    else:
        assert (view.plan.id, view.counter) == ("free", Counter.LIFETIME)


@settings(max_examples=300, deadline=None)
@given(actions=ACTION_LISTS, free_used=st.integers(0, 60), used=st.integers(0, 1800), data=st.data())
def test_forgetting_old_subscriptions_keeps_convergence_and_the_bound(
    actions: list[tuple[str, int]], free_used: int, used: int, data: st.DataObject
) -> None:
    life = history(actions, step=4 * DAY)
    final = check_any_order_converges(life.events, data, free_used, used, TIGHT_MEMORY)
    assert len(final.private.subscriptions) <= TIGHT_MEMORY.max_subscriptions
    # Whatever is forgotten, the newest change is kept.
    newest = max(life.subscriptions, key=lambda sub: sub["resource_version"])
    assert newest["id"] in final.private.subscriptions


def test_free_user_subscribes_streams_and_renews() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    metadata = deliver(BillingMetadata(public=PublicBilling(free_seconds_used=45)), life.events)
    view = entitlement(metadata.public, CATALOGUE)
    assert (view.plan.name, view.remaining_seconds, view.counter) == ("Pro", 30 * 60, Counter.PERIOD)
    assert metadata.public.period_start == life.subscription["current_term_start"]

    metadata = stream(metadata, 600)
    assert entitlement(metadata.public, CATALOGUE).remaining_seconds == 20 * 60

    before = len(life.events)
    life.act("renew")
    renewal = life.events[before:]
    renewed = deliver(metadata, renewal)
    assert entitlement(renewed.public, CATALOGUE).remaining_seconds == 30 * 60
    assert renewed.public.period_start == life.subscription["current_term_start"]

    # Streams in the new term, then ChargeBee replays the renewal: usage must survive.
    renewed = stream(renewed, 120)
    assert deliver(renewed, renewal) == renewed
    assert entitlement(renewed.public, CATALOGUE).remaining_seconds == 28 * 60


def test_plan_change_keeps_usage_of_the_term() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    metadata = stream(deliver(BillingMetadata(), life.events), 25 * 60)
    life.act("change_plan")
    metadata = deliver(metadata, life.events[-1:])
    view = entitlement(metadata.public, CATALOGUE)
    assert (view.plan.name, view.remaining_seconds) == ("Ultra", 35 * 60)


def test_late_created_cannot_undo_a_cancellation() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    life.act("cancel")
    created, cancelled = life.events[0], life.events[-1]
    metadata = deliver(BillingMetadata(public=PublicBilling(free_seconds_used=60)), [cancelled, created])
    assert metadata.public.plan == "free"
    assert metadata.public.status == "cancelled"
    # The free minute was spent before subscribing; cancelling does not hand out a new one.
    assert entitlement(metadata.public, CATALOGUE).remaining_seconds == 0


def test_scheduled_cancellation_keeps_the_plan_until_the_term_ends() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    life.act("schedule_cancel")
    metadata = deliver(BillingMetadata(), life.events)
    assert (metadata.public.plan, metadata.public.status) == ("pro", "non_renewing")
    assert entitlement(metadata.public, CATALOGUE).remaining_seconds == 30 * 60
    life.act("renew")  # the term ends: ChargeBee cancels instead of renewing
    metadata = deliver(metadata, life.events)
    assert (metadata.public.plan, metadata.public.status) == ("free", "cancelled")


def test_failed_renewal_payment_is_shown_and_cleared() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(ULTRA)
    life.act("renew_payment_fails")
    metadata = deliver(BillingMetadata(), life.events)
    assert metadata.public.payment_due is True
    assert entitlement(metadata.public, CATALOGUE).plan.name == "Ultra"
    life.act("pay_due")
    assert deliver(metadata, life.events).public.payment_due is False


def test_deleted_subscription_is_final_even_at_the_same_version() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    created = life.events[0]
    deleted_body = msgspec.structs.replace(created, id="ev_deleted", event_type="subscription_deleted")
    metadata = deliver(BillingMetadata(), [created, deleted_body, created])
    assert (metadata.public.plan, metadata.public.status) == ("free", None)
    assert metadata.private.subscriptions["sub_1"].deleted is True


def test_paused_subscription_falls_back_to_the_free_allowance() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    life.act("pause")
    metadata = deliver(BillingMetadata(public=PublicBilling(free_seconds_used=20)), life.events)
    view = entitlement(metadata.public, CATALOGUE)
    assert (view.subscribed_plan.name, view.plan.name, view.remaining_seconds) == ("Pro", "Free", 40)


def test_newer_subscription_wins_over_events_of_an_older_one() -> None:
    life = Lifecycle(customer_id="user_1", item_prices=(PRO, ULTRA))
    life.start(PRO)
    life.act("cancel")
    life.act("subscribe_again")
    old_cancel = [e for e in life.events if e.event_type == "subscription_cancelled"]
    metadata = deliver(BillingMetadata(), [*life.events, *old_cancel])
    assert granting_subscription(metadata.private.subscriptions, CATALOGUE) == "sub_2"
    assert (metadata.public.plan, metadata.public.status) == ("ultra", "active")


def test_unknown_item_price_changes_nothing(catalogue: PlanCatalogue) -> None:
    life = Lifecycle(customer_id="user_1", item_prices=("someone-elses-plan", ULTRA))
    life.start("someone-elses-plan")
    outcome = apply_event(BillingMetadata(), life.events[0], catalogue)
    assert not outcome.changed
    assert "someone-elses-plan" in outcome.reason
