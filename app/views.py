"""What the pages show of an account and of the plans: view models built from the billing metadata and the
catalogue, with the words and numbers the templates print. Pure functions, shared by the pricing and
account pages and the studio's usage meter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec

from billing.accounts import Account
from billing.entitlement import Entitlement, entitlement, format_clock
from billing.plans import Plan, PlanCatalogue
from billing.statuses import STATUSES


class PlanCard(msgspec.Struct, frozen=True, kw_only=True):
    plan: Plan
    current: bool
    # "checkout": a form posting the plan; "sign-in": a link; "none": nothing to buy (Free).
    action: Literal["checkout", "sign-in", "none"]
    label: str
    allowance: str


class AccountView(msgspec.Struct, frozen=True, kw_only=True):
    plan_name: str
    status_label: str
    status_tone: str
    time_left: str
    allowance: str
    allowance_note: str
    used_percent: int
    low: bool
    renewal: str | None
    payment_due: bool
    can_manage: bool
    on_free_allowance: bool


def _date(timestamp: int | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%-d %b %Y")


def _duration(seconds: int) -> str:
    if seconds % 60 == 0:
        minutes = seconds // 60
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _allowance_text(plan: Plan) -> str:
    if plan.lifetime:
        return f"{_duration(plan.seconds)} of live restyling, once"
    return f"{_duration(plan.seconds)} of live restyling every month"


def plan_cards(catalogue: PlanCatalogue, account: Account | None, signed_in: bool) -> list[PlanCard]:
    current = entitlement(account.metadata.public, catalogue) if account else None
    cards = []
    for plan in catalogue.plans:
        is_current = current is not None and current.plan.id == plan.id
        action: Literal["checkout", "sign-in", "none"]
        if not plan.paid:
            action, label = ("none", "Included") if signed_in else ("sign-in", "Start free")
        elif not signed_in:
            action, label = "sign-in", f"Sign in to choose {plan.name}"
        elif is_current:
            action, label = "checkout", "Manage plan"
        elif current is not None and current.plan.paid:
            action, label = "checkout", f"Switch to {plan.name}"
        else:
            action, label = "checkout", f"Choose {plan.name}"
        cards.append(
            PlanCard(
                plan=plan, current=is_current, action=action, label=label, allowance=_allowance_text(plan)
            )
        )
    return cards


def account_view(account: Account, catalogue: PlanCatalogue) -> AccountView:
    public = account.metadata.public
    view: Entitlement = entitlement(public, catalogue)
    status = None if public.status is None else STATUSES[public.status]
    if status is None:
        status_label, tone = ("Free plan", "ok")
    else:
        status_label, tone = status.label, status.tone
    if public.payment_due and status is not None and status.dunning:
        status_label, tone = "Payment due", "bad"
    renewal = None
    if public.period_end is not None and status is not None and status.term_end is not None:
        renewal = f"{status.term_end} {_date(public.period_end)}"
    used_percent = (
        100 if view.allowance_seconds == 0 else round(100 * view.used_seconds / view.allowance_seconds)
    )
    return AccountView(
        plan_name=view.subscribed_plan.name,
        status_label=status_label,
        status_tone=tone,
        time_left=format_clock(view.remaining_seconds),
        allowance=format_clock(view.allowance_seconds),
        allowance_note="once, for your account" if view.plan.lifetime else "this billing period",
        used_percent=min(100, used_percent),
        low=view.remaining_seconds <= max(60, view.allowance_seconds // 10),
        renewal=renewal,
        payment_due=public.payment_due,
        can_manage=account.metadata.private.customer_id is not None,
        on_free_allowance=not view.plan.paid,
    )
