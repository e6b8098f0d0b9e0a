"""A small model of one ChargeBee customer's subscription history, producing the webhook events ChargeBee
would send, for tests of event application. Test data only: the app never imports it."""

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
    "reactivate",
    "pause",
    "resume",
    "delete",
    "subscribe_again",
)


@dataclass
class Lifecycle:
    customer_id: str
    item_prices: tuple[str, str]
    now: int = 1_760_000_000
    sequence: int = 0
    subscription: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False
    events: list[ChargebeeEvent] = field(default_factory=list)
    # The same events as ChargeBee would POST them.
    bodies: list[bytes] = field(default_factory=list)

    def start(self, item_price: str) -> None:
        self.sequence += 1
        self.deleted = False
        self.subscription = {
            "id": f"sub_{self.sequence}",
            "customer_id": self.customer_id,
            "status": "active",
            "created_at": self.now,
            "current_term_start": self.now,
            "current_term_end": self.now + MONTH,
            "resource_version": self.now * 1000,
            "due_invoices_count": 0,
            "subscription_items": [{"item_price_id": item_price, "item_type": "plan", "quantity": 1}],
        }
        self._emit("subscription_created", "payment_succeeded")

    def act(self, action: str) -> None:
        """Apply an action if it makes sense in the current state; otherwise do nothing."""
        self.now += 3600
        sub, status = self.subscription, self.subscription.get("status")
        if self.deleted and action != "subscribe_again":
            return
        if action == "renew" and status in ("active", "non_renewing"):
            self._next_term(fail=False)
        elif action == "renew_payment_fails" and status == "active":
            self._next_term(fail=True)
        elif action == "pay_due" and sub.get("due_invoices_count"):
            sub["due_invoices_count"] = 0
            self._emit("payment_succeeded")
        elif action == "change_plan" and status in ("active", "non_renewing"):
            current = sub["subscription_items"][0]["item_price_id"]
            other = self.item_prices[1] if current == self.item_prices[0] else self.item_prices[0]
            sub["subscription_items"] = [{"item_price_id": other, "item_type": "plan", "quantity": 1}]
            self._emit("subscription_changed")
        elif action == "schedule_cancel" and status == "active":
            sub["status"] = "non_renewing"
            self._emit("subscription_cancellation_scheduled")
        elif action == "remove_scheduled_cancel" and status == "non_renewing":
            sub["status"] = "active"
            self._emit("subscription_scheduled_cancellation_removed")
        elif action == "cancel" and status in ("active", "non_renewing", "paused"):
            self._cancel()
        elif action == "reactivate" and status == "cancelled":
            sub.update(status="active", current_term_start=self.now, current_term_end=self.now + MONTH)
            self._emit("subscription_reactivated", "payment_succeeded")
        elif action == "pause" and status == "active":
            sub["status"] = "paused"
            self._emit("subscription_paused")
        elif action == "resume" and status == "paused":
            sub["status"] = "active"
            self._emit("subscription_resumed")
        elif action == "delete" and sub:
            self.deleted = True
            self._emit("subscription_deleted")
        elif action == "subscribe_again" and (self.deleted or status == "cancelled"):
            self.start(self.item_prices[self.sequence % 2])

    def _next_term(self, *, fail: bool) -> None:
        sub = self.subscription
        if sub["status"] == "non_renewing":
            self._cancel()
            return
        sub["current_term_start"] = sub["current_term_end"]
        sub["current_term_end"] = sub["current_term_start"] + MONTH
        if fail:
            sub["due_invoices_count"] = 1
            self._emit("subscription_renewed", "payment_failed")
        else:
            self._emit("subscription_renewed", "payment_succeeded")

    def _cancel(self) -> None:
        sub = self.subscription
        sub["status"] = "cancelled"
        sub["due_invoices_count"] = 0
        sub.pop("current_term_start", None)
        sub.pop("current_term_end", None)
        self._emit("subscription_cancelled")

    def _emit(self, *event_types: str) -> None:
        # One change, one new resource_version; the events a change triggers share its snapshot.
        sub = self.subscription
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
