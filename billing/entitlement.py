"""What an account may stream right now, decided from its public billing metadata and the catalogue.

The rules (also in docs/metadata.md):

* A paid plan whose subscription is in a granting status (billing/statuses.py) grants the
  plan's seconds per billing period, counted in `seconds_used`, which resets when a new term starts.
* Everything else (never subscribed, cancelled, deleted, paused, future) falls back to the Free
  allowance: `free_plan_seconds` once per account, counted in `free_seconds_used`, which never resets.
  So cancelling never hands out a fresh free minute, and subscribing never takes an unused one away.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from billing.metadata import PublicBilling
from billing.plans import Plan, PlanCatalogue
from billing.statuses import GRANTING_STATUSES


class Counter(StrEnum):
    """Which usage counter streaming time is added to."""

    PERIOD = "seconds_used"
    LIFETIME = "free_seconds_used"


class Entitlement(msgspec.Struct, frozen=True, kw_only=True):
    # The plan whose allowance applies now.
    plan: Plan
    # The plan of the account's subscription, which differs from `plan` while it is paused or not started.
    subscribed_plan: Plan
    allowance_seconds: int
    used_seconds: int
    counter: Counter

    @property
    def remaining_seconds(self) -> int:
        return max(0, self.allowance_seconds - self.used_seconds)

    @property
    def exhausted(self) -> bool:
        return self.remaining_seconds == 0


def entitlement(public: PublicBilling, catalogue: PlanCatalogue) -> Entitlement:
    subscribed = catalogue.get(public.plan)
    if subscribed.paid and public.status in GRANTING_STATUSES:
        return Entitlement(
            plan=subscribed,
            subscribed_plan=subscribed,
            allowance_seconds=subscribed.seconds,
            used_seconds=public.seconds_used,
            counter=Counter.PERIOD,
        )
    free = catalogue.free
    return Entitlement(
        plan=free,
        subscribed_plan=subscribed,
        allowance_seconds=free.seconds,
        used_seconds=public.free_seconds_used,
        counter=Counter.LIFETIME,
    )


def format_clock(seconds: int) -> str:
    """Seconds as minutes:seconds, the way the pages show time left ("30:00", "0:42")."""
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
