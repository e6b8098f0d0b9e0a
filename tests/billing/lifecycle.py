"""A small model of one ChargeBee customer's subscriptions, producing the webhook events ChargeBee would
send, for tests of event application. Test data only: the app never imports it.

A customer can have several subscriptions: Stylecast opens a new checkout only when none is live
(`subscribe_again`), but an old cancelled one can be reactivated later, and a second live one can be made
by hand in ChargeBee (`subscribe_by_hand`). Actions act on one of them (`target`, an index into the
subscriptions in creation order, taken modulo their number; the newest by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from billing.webhooks import ChargebeeEvent, parse_event

DAY = 86_400
MONTH = 30 * DAY
ACTIONS = (
    "renew",
    "renew_payment_fails",
    "pay_due",
    "change_plan",
    "schedule_cancel",
    "remove_scheduled_cancel",
    "cancel",
    "cancel_backdated",
    "reactivate",
    "reactivate_backdated",
    "pause",
    "resume",
    "delete",
    "subscribe_again",
    "subscribe_by_hand",
)
# Statuses in which Stylecast sends a customer to the portal instead of a second checkout.
_LIVE = ("future", "in_trial", "active", "non_renewing", "paused")


@dataclass
class Lifecycle:
    customer_id: str
    item_prices: tuple[str, str]
    now: int = 1_760_000_000
    # Seconds that pass before each action.
    step: int = 3600
    subscriptions: list[dict[str, Any]] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    events: list[ChargebeeEvent] = field(default_factory=list)
    # The same events as ChargeBee would POST them.
    bodies: list[bytes] = field(default_factory=list)

    @property
    def subscription(self) -> dict[str, Any]:
        """The newest subscription."""
        return self.subscriptions[-1] if self.subscriptions else {}

    def start(self, item_price: str) -> dict[str, Any]:
        subscription = {
            "id": f"sub_{len(self.subscriptions) + 1}",
            "customer_id": self.customer_id,
            "status": "active",
            "created_at": self.now,
            "current_term_start": self.now,
            "current_term_end": self.now + MONTH,
            "resource_version": self.now * 1000,
            "due_invoices_count": 0,
            "subscription_items": [{"item_price_id": item_price, "item_type": "plan", "quantity": 1}],
        }
        self.subscriptions.append(subscription)
        self._emit(subscription, "subscription_created", "payment_succeeded")
        return subscription

    def act(self, action: str, target: int | None = None) -> None:
        """Apply an action to one subscription if it makes sense in its state; otherwise do nothing."""
        self.now += self.step
        if action in ("subscribe_again", "subscribe_by_hand"):
            live = any(sub["status"] in _LIVE for sub in self.subscriptions if sub["id"] not in self.deleted)
            if action == "subscribe_by_hand" or not live:
                self.start(self.item_prices[len(self.subscriptions) % 2])
            return
        if not self.subscriptions:
            return
        sub = self.subscriptions[-1 if target is None else target % len(self.subscriptions)]
        status = sub["status"]
        if sub["id"] in self.deleted:
            return
        if action == "renew" and status in ("active", "non_renewing"):
            self._next_term(sub, fail=False)
        elif action == "renew_payment_fails" and status == "active":
            self._next_term(sub, fail=True)
        elif action == "pay_due" and sub.get("due_invoices_count"):
            sub["due_invoices_count"] = 0
            self._emit(sub, "payment_succeeded")
        elif action == "change_plan" and status in ("active", "non_renewing"):
            current = sub["subscription_items"][0]["item_price_id"]
            other = self.item_prices[1] if current == self.item_prices[0] else self.item_prices[0]
            sub["subscription_items"] = [{"item_price_id": other, "item_type": "plan", "quantity": 1}]
            self._emit(sub, "subscription_changed")
        elif action == "schedule_cancel" and status == "active":
            sub["status"] = "non_renewing"
            self._emit(sub, "subscription_cancellation_scheduled")
        elif action == "remove_scheduled_cancel" and status == "non_renewing":
            sub["status"] = "active"
            self._emit(sub, "subscription_scheduled_cancellation_removed")
        elif action == "cancel" and status in ("active", "non_renewing", "paused"):
            self._cancel(sub, "subscription_cancelled")
        elif action == "cancel_backdated" and status in ("active", "non_renewing"):
            # An operator cancels as of a moment in the current term that has already passed.
            self._cancel(sub, "subscription_canceled_with_backdating")
        elif action == "reactivate" and status == "cancelled":
            sub.update(status="active", current_term_start=self.now, current_term_end=self.now + MONTH)
            self._emit(sub, "subscription_reactivated", "payment_succeeded")
        elif action == "reactivate_backdated" and status == "cancelled":
            start = self.now - self.step // 2
            sub.update(status="active", current_term_start=start, current_term_end=start + MONTH)
            self._emit(sub, "subscription_reactivated_with_backdating", "payment_succeeded")
        elif action == "pause" and status == "active":
            sub["status"] = "paused"
            self._emit(sub, "subscription_paused")
        elif action == "resume" and status == "paused":
            sub["status"] = "active"
            self._emit(sub, "subscription_resumed")
        elif action == "delete":
            self.deleted.add(sub["id"])
            self._emit(sub, "subscription_deleted")

    def _next_term(self, sub: dict[str, Any], *, fail: bool) -> None:
        if sub["status"] == "non_renewing":
            self._cancel(sub, "subscription_cancelled")
            return
        sub["current_term_start"] = sub["current_term_end"]
        sub["current_term_end"] = sub["current_term_start"] + MONTH
        if fail:
            sub["due_invoices_count"] = 1
            self._emit(sub, "subscription_renewed", "payment_failed")
        else:
            self._emit(sub, "subscription_renewed", "payment_succeeded")

    def _cancel(self, sub: dict[str, Any], event_type: str) -> None:
        sub["status"] = "cancelled"
        sub["due_invoices_count"] = 0
        sub.pop("current_term_start", None)
        sub.pop("current_term_end", None)
        self._emit(sub, event_type)

    def _emit(self, sub: dict[str, Any], *event_types: str) -> None:
        # One change, one new resource_version; the events a change triggers share its snapshot.
        sub["resource_version"] = max(self.now * 1000, sub["resource_version"] + 1)
        for event_type in event_types:
            body = {
                "id": f"ev_{len(self.events) + 1}",
                "occurred_at": self.now,
                "object": "event",
                "api_version": "v2",
                "event_type": event_type,
                "content": {"subscription": dict(sub), "customer": {"id": self.customer_id}},
            }
            encoded = msgspec.json.encode(body)
            self.bodies.append(encoded)
            self.events.append(parse_event(encoded))
