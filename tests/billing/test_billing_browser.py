"""The whole subscription lifecycle in Chromium against `python -m app` in sandbox mode: sign in, choose
Pro, pay on the (sandbox) hosted checkout, see Pro on the account page, cancel in the portal."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import AppProcess, save_screenshot, sign_in

pytestmark = pytest.mark.browser


def test_subscribe_to_pro_and_cancel_in_the_portal(start_app: Callable[..., AppProcess], page: Page) -> None:
    app = start_app()
    page.goto(f"{app.url}/pricing")
    expect(page.get_by_test_id("choose-pro")).to_have_text("Sign in to choose Pro")

    sign_in(page, app.url, "grace@example.com", next_path="/pricing")
    expect(page.get_by_test_id("plan-free")).to_have_attribute("aria-current", "true")
    page.get_by_test_id("choose-pro").click()

    page.wait_for_url(re.compile(r".*/sandbox/chargebee/checkout/hp_\w+$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Stylecast Pro")
    save_screenshot(page, "billing-checkout")
    page.get_by_test_id("pay").click()

    page.wait_for_url(re.compile(r".*/account\?.*state=succeeded"))
    expect(page.get_by_test_id("account-plan")).to_have_text("Pro")
    expect(page.get_by_test_id("account-status")).to_have_text("Active")
    expect(page.get_by_test_id("time-left")).to_have_text("30:00")
    expect(page.locator(".meter-row")).to_contain_text("30:00 left")
    expect(page.get_by_test_id("account-renewal")).to_contain_text("Renews on")
    save_screenshot(page, "billing-account-pro")

    page.get_by_test_id("manage-subscription").click()
    page.wait_for_url(re.compile(r".*/sandbox/chargebee/portal/[\w-]+$"))
    expect(page.get_by_test_id("portal-status")).to_have_text("active")
    page.get_by_test_id("cancel-subscription").click()
    expect(page.get_by_test_id("portal-status")).to_have_text("non_renewing")
    save_screenshot(page, "billing-portal-cancelled")

    page.get_by_test_id("portal-back").click()
    page.wait_for_url(re.compile(r".*/account\?returned=portal&t=[\w.-]+$"))
    expect(page.get_by_test_id("account-plan")).to_have_text("Pro")
    expect(page.get_by_test_id("account-status")).to_have_text("Cancels at period end")
    expect(page.get_by_test_id("account-renewal")).to_contain_text("Ends on")
    expect(page.get_by_test_id("time-left")).to_have_text("30:00")
    save_screenshot(page, "billing-account-cancelling")

    # The pricing page agrees, and its plan cards mark Pro as the current plan.
    page.goto(f"{app.url}/pricing")
    expect(page.get_by_test_id("plan-pro")).to_have_attribute("aria-current", "true")
    expect(page.get_by_test_id("choose-pro")).to_have_text("Manage plan")
