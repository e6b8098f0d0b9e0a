"""ChargeBee's subscription statuses, one row each (billing/statuses.py), and what an account in each one
gets and sees: the allowance it may stream, the account page's words, and whether the customer may buy a
second subscription."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.views import account_view
from app.wiring import plan_catalogue
from billing.accounts import Account
from billing.entitlement import entitlement
from billing.metadata import BillingMetadata, PrivateBilling, PublicBilling
from billing.plans import PlanCatalogue, PlanId
from billing.statuses import LIVE_STATUSES, STATUSES, SubscriptionStatus
from tests.billing.conftest import sandbox_settings

TERM_END = 1_767_225_600  # 1 Jan 2026, 00:00 UTC


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> PlanCatalogue:
    return plan_catalogue(sandbox_settings(Path(tmp_path_factory.mktemp("statuses"))))


def on_pro(status: SubscriptionStatus, *, payment_due: bool = False) -> Account:
    public = PublicBilling(
        plan=PlanId.PRO,
        status=status,
        payment_due=payment_due,
        period_start=TERM_END - 30 * 86400,
        period_end=TERM_END,
    )
    metadata = BillingMetadata(public=public, private=PrivateBilling(customer_id="user_1"))
    return Account(user_id="user_1", email="ada@example.com", metadata=metadata)


def test_every_chargebee_status_has_exactly_one_row() -> None:
    assert set(STATUSES) == set(SubscriptionStatus)
    assert {status.value for status in SubscriptionStatus} == {
        "future", "in_trial", "active", "non_renewing", "paused", "cancelled", "transferred",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("status", "plan"),
    [
        (SubscriptionStatus.IN_TRIAL, PlanId.PRO),
        (SubscriptionStatus.ACTIVE, PlanId.PRO),
        (SubscriptionStatus.NON_RENEWING, PlanId.PRO),
        (SubscriptionStatus.FUTURE, PlanId.FREE),
        (SubscriptionStatus.PAUSED, PlanId.FREE),
        (SubscriptionStatus.CANCELLED, PlanId.FREE),
        (SubscriptionStatus.TRANSFERRED, PlanId.FREE),
    ],
)
def test_only_a_paid_up_subscription_grants_its_plan(
    catalogue: PlanCatalogue, status: SubscriptionStatus, plan: PlanId
) -> None:
    assert entitlement(on_pro(status).metadata.public, catalogue).plan.id is plan


@pytest.mark.parametrize(
    ("status", "payment_due", "label", "renewal"),
    [
        (SubscriptionStatus.ACTIVE, False, "Active", "Renews on 1 Jan 2026"),
        (SubscriptionStatus.IN_TRIAL, False, "Trial", "Renews on 1 Jan 2026"),
        (SubscriptionStatus.NON_RENEWING, False, "Cancels at period end", "Ends on 1 Jan 2026"),
        (SubscriptionStatus.FUTURE, False, "Starts soon", None),
        (SubscriptionStatus.PAUSED, False, "Paused", None),
        (SubscriptionStatus.CANCELLED, False, "Cancelled", None),
        (SubscriptionStatus.TRANSFERRED, False, "Transferred", None),
        # Dunning shows while the subscription bills, and not on a trial, which has no invoice to pay.
        (SubscriptionStatus.ACTIVE, True, "Payment due", "Renews on 1 Jan 2026"),
        (SubscriptionStatus.NON_RENEWING, True, "Payment due", "Ends on 1 Jan 2026"),
        (SubscriptionStatus.IN_TRIAL, True, "Trial", "Renews on 1 Jan 2026"),
        (SubscriptionStatus.PAUSED, True, "Paused", None),
    ],
)
def test_the_account_page_names_each_status(
    catalogue: PlanCatalogue, status: SubscriptionStatus, payment_due: bool, label: str, renewal: str | None
) -> None:
    view = account_view(on_pro(status, payment_due=payment_due), catalogue)
    assert (view.status_label, view.renewal) == (label, renewal)


def test_a_customer_keeps_one_subscription_that_bills_or_may_bill_again() -> None:
    # Checkout sends a customer with one of these to the portal instead of selling a second subscription.
    assert set(LIVE_STATUSES) == {
        SubscriptionStatus.FUTURE,
        SubscriptionStatus.IN_TRIAL,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.NON_RENEWING,
        SubscriptionStatus.PAUSED,
    }
