"""Pricing, account, checkout and portal as a signed-in person meets them: the whole app over HTTP, with
the sandbox ChargeBee and Clerk behind the real SDKs."""

from __future__ import annotations

import html
import re
import time
from urllib.parse import parse_qs, urlsplit

import httpx

from app.settings import SANDBOX_CHARGEBEE_PREFIX
from inference.protocol import UsageReport
from inference.usage_reporter import encode_usage_report
from tests.billing.conftest import RunningApp, csrf


def element_texts(html: str) -> dict[str, str]:
    """Text of every element with a data-testid (first occurrence), whitespace collapsed."""
    found: dict[str, str] = {}
    for name, text in re.findall(r'data-testid="([^"]+)"[^>]*>([^<]*)<', html):
        found.setdefault(name, " ".join(text.split()))
    return found


def checkout(client: httpx.Client, plan: str, *, htmx: bool = False) -> httpx.Response:
    headers = {"hx-request": "true"} if htmx else {}
    return client.post(
        "/api/billing/checkout", data={"plan": plan, "_csrf_token": csrf(client, "/pricing")}, headers=headers
    )


def pay(client: httpx.Client, checkout_url: str) -> httpx.Response:
    path = urlsplit(checkout_url).path
    page = client.get(path)
    assert page.status_code == 200
    assert 'data-testid="pay"' in page.text
    return client.post(f"{path}/pay", data={"_csrf_token": csrf(client, path)})


def portal_subscriptions(client: httpx.Client, portal_url: str) -> list[str]:
    """The subscriptions the portal shows, newest first."""
    page = client.get(urlsplit(portal_url).path).text
    return list(dict.fromkeys(re.findall(r'name="subscription_id" value="([^"]+)"', page)))


def portal_action(
    client: httpx.Client, portal_url: str, action: str, subscription_id: str | None = None
) -> httpx.Response:
    """Press a button in the portal, for `subscription_id` (the newest by default)."""
    path = urlsplit(portal_url).path
    if subscription_id is None:
        shown = portal_subscriptions(client, portal_url)
        assert shown, "the portal shows no subscription"
        subscription_id = shown[0]
    return client.post(
        f"{path}/action",
        data={"_csrf_token": csrf(client, path), "subscription_id": subscription_id, "action": action},
    )


def open_portal(client: httpx.Client) -> str:
    opened = client.post("/api/billing/portal", data={"_csrf_token": csrf(client, "/account")})
    assert opened.status_code == 303
    return str(opened.headers["location"])


def portal_back_link(client: httpx.Client, portal_url: str) -> str:
    """The portal's "Back to Stylecast" link: the return address the app gave the portal session."""
    page = client.get(urlsplit(portal_url).path).text
    found = re.search(r'href="([^"]+)" data-testid="portal-back"', page)
    assert found, page
    target = urlsplit(html.unescape(found.group(1)))
    return f"{target.path}?{target.query}"


def back_from_portal(client: httpx.Client, portal_url: str) -> httpx.Response:
    return client.get(portal_back_link(client, portal_url))


def until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_signed_out_visitors_see_plans_but_cannot_buy(app: RunningApp) -> None:
    with app.browser() as client:
        pricing = client.get("/pricing")
        assert pricing.status_code == 200
        ids = element_texts(pricing.text)
        assert ids["choose-pro"] == "Sign in to choose Pro"
        assert ids["choose-ultra"] == "Sign in to choose Ultra"
        assert "$12 / month" in pricing.text
        assert "30 minutes of live restyling every month" in pricing.text
        assert "60 minutes of live restyling every month" in pricing.text
        assert "1 minute of live restyling, once" in pricing.text
        assert 'data-testid="current-plan"' not in pricing.text

        assert client.get("/account").headers["location"].startswith("/sign-in?next=/account")
        token = csrf(client)
        refused = client.post("/api/billing/checkout", data={"plan": "pro", "_csrf_token": token})
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthenticated"
        # Without the CSRF token the post does not even get that far.
        assert client.post("/api/billing/checkout", data={"plan": "pro"}).status_code == 403


def test_free_account_shows_its_lifetime_minute_and_the_plans(app: RunningApp) -> None:
    with app.browser() as client:
        app.sign_in(client, "ada@example.com")
        account = client.get("/account")
        ids = element_texts(account.text)
        assert (ids["account-plan"], ids["account-status"], ids["time-left"]) == ("Free", "Free plan", "1:00")
        assert "manage-subscription" not in ids
        assert ids["choose-pro"] == "Choose Pro"  # the upgrade cards are on the account page

        cards = client.get("/partials/plan-cards")
        assert cards.status_code == 200
        assert "<html" not in cards.text  # a fragment for htmx, not a page
        assert re.search(r'data-testid="plan-free"[^>]*aria-current="true"', cards.text)
        assert not re.search(r'data-testid="plan-pro"[^>]*aria-current', cards.text)


def test_unknown_plans_are_refused_on_the_server(app: RunningApp) -> None:
    with app.browser() as client:
        app.sign_in(client, "bob@example.com")
        for plan in ("free", "enterprise", ""):
            refused = checkout(client, plan)
            assert refused.status_code == 303
            assert refused.headers["location"] == "/pricing?error=unknown-plan"
        htmx = checkout(client, "platinum", htmx=True)
        assert htmx.status_code == 400
        assert htmx.headers["hx-redirect"] == "/pricing?error=unknown-plan"
        shown = client.get("/pricing?error=unknown-plan")
        assert element_texts(shown.text)["billing-error"].startswith("That plan does not exist")


def test_buying_pro_then_managing_it_in_the_portal(app: RunningApp) -> None:
    user_id = app.create_user("cyd@example.com")
    with app.browser() as client:
        app.sign_in(client, "cyd@example.com")
        started = checkout(client, "pro", htmx=True)
        assert started.status_code == 200
        checkout_url = started.headers["hx-redirect"]
        assert checkout_url.startswith(f"{app.settings.app_url}{SANDBOX_CHARGEBEE_PREFIX}/checkout/")
        assert "$12 / month" in client.get(urlsplit(checkout_url).path).text  # the server's price

        paid = pay(client, checkout_url)
        assert paid.status_code == 303
        landing = urlsplit(paid.headers["location"])
        assert landing.path == "/account"
        assert parse_qs(landing.query)["state"] == ["succeeded"]

        account = client.get(f"/account?{landing.query}")
        ids = element_texts(account.text)
        assert ids["billing-notice"] == "Payment received. Thank you!"
        assert (ids["account-plan"], ids["account-status"], ids["time-left"]) == ("Pro", "Active", "30:00")
        assert ids["account-renewal"].startswith("Renews on ")
        assert ids["manage-subscription"] == "Manage subscription"
        assert "choose-ultra" not in ids  # subscribers manage their plan in the portal

        # The webhooks arrive afterwards and find nothing left to do.
        metadata = app.metadata(user_id)
        assert metadata.private.customer_id == user_id
        [subscription_id] = metadata.private.subscriptions

        pricing = client.get("/pricing")
        assert re.search(r'data-testid="plan-pro"[^>]*aria-current="true"', pricing.text)
        assert element_texts(pricing.text)["choose-ultra"] == "Switch to Ultra"

        # A second purchase is not possible: choosing Ultra opens the portal to change the plan.
        switch = checkout(client, "ultra")
        assert switch.status_code == 303
        portal_url = switch.headers["location"]
        assert f"{SANDBOX_CHARGEBEE_PREFIX}/portal/" in portal_url

        # Ten minutes were streamed: a ticket, and the worker's final report of its stream; then the term
        # renews.
        ticket = client.post("/api/stream/ticket", headers={"x-csrftoken": csrf(client, "/pricing")})
        assert ticket.status_code == 200, ticket.text
        streamed = UsageReport(
            stream_id=ticket.json()["stream_id"],
            user_id=user_id,
            worker_id="test-gpu",
            seconds=600,
            final=True,
            sent_at=0.0,
        )
        body, headers = encode_usage_report(app.settings.stream_secret, streamed)
        assert httpx.post(f"{app.url}/api/usage/report", content=body, headers=headers).status_code == 200
        assert element_texts(client.get("/account").text)["time-left"] == "20:00"
        renewed = portal_action(client, portal_url, "advance_term")
        assert renewed.status_code == 303
        back = back_from_portal(client, portal_url)
        assert element_texts(back.text)["time-left"] == "30:00"

        # Back again within the refresh interval: the webhook brings the change, and the page says so.
        cancelled = portal_action(client, portal_url, "cancel_end_of_term")
        assert cancelled.status_code == 303
        again = element_texts(back_from_portal(client, portal_url).text)
        assert again["billing-notice"].startswith("Changes you just made in the billing portal")
        until(lambda: element_texts(client.get("/account").text)["account-status"] == "Cancels at period end")
        ids = element_texts(client.get("/account").text)
        assert ids["account-plan"] == "Pro"
        assert ids["account-renewal"].startswith("Ends on ")
        assert ids["time-left"] == "30:00"

        # The portal button itself answers with the portal's URL.
        opened = client.post("/api/billing/portal", data={"_csrf_token": csrf(client, "/account")})
        assert opened.status_code == 303
        assert f"{SANDBOX_CHARGEBEE_PREFIX}/portal/" in opened.headers["location"]

        portal_action(client, portal_url, "advance_term")  # the term ends: the subscription with it
        until(lambda: element_texts(client.get("/account").text)["account-status"] == "Cancelled")
        assert element_texts(client.get("/account").text)["account-plan"] == "Free"

    # However the webhooks raced the page syncs, the metadata ends where ChargeBee is.
    until(lambda: app.metadata(user_id).public.status == "cancelled")
    final = app.metadata(user_id)
    assert (final.public.plan, list(final.private.subscriptions)) == ("free", [subscription_id])


def test_failed_renewal_payment_is_shown_on_the_account(app: RunningApp) -> None:
    with app.browser() as client:
        app.sign_in(client, "dee@example.com")
        pay(client, checkout(client, "ultra").headers["location"])
        portal = client.post("/api/billing/portal", data={"_csrf_token": csrf(client, "/account")})
        portal_action(client, portal.headers["location"], "advance_term_payment_fails")
        ids = element_texts(back_from_portal(client, portal.headers["location"]).text)
        assert (ids["account-plan"], ids["account-status"]) == ("Ultra", "Payment due")
        assert "payment-due" in ids


def test_someone_elses_checkout_does_not_grant_a_plan(app: RunningApp) -> None:
    with app.browser() as buyer:
        app.sign_in(buyer, "eve@example.com")
        started = checkout(buyer, "ultra")
        paid = pay(buyer, started.headers["location"])
        stolen_query = urlsplit(paid.headers["location"]).query

    with app.browser() as other:
        app.sign_in(other, "mallory@example.com")
        ids = element_texts(other.get(f"/account?{stolen_query}").text)
        assert ids["account-plan"] == "Free"
        assert "billing-notice" not in ids
        made_up = element_texts(other.get("/account?id=hp_made_up&state=succeeded").text)
        assert made_up["account-plan"] == "Free"
        assert "billing-notice" not in made_up


def test_pages_never_carry_billing_secrets(app: RunningApp) -> None:
    user_id = app.create_user("fay@example.com")
    with app.browser() as client:
        app.sign_in(client, "fay@example.com")
        pay(client, checkout(client, "pro").headers["location"])
        pages = [
            client.get(path).text for path in ("/account", "/pricing", "/partials/plan-cards", "/studio")
        ]
    metadata = app.metadata(user_id)
    secrets = [
        app.settings.chargebee_api_key,
        app.settings.chargebee_webhook_password,
        app.settings.clerk_secret_key,
        *metadata.private.subscriptions,
    ]
    for page in pages:
        for secret in secrets:
            assert secret not in page


def test_reactivating_an_older_subscription_after_a_newer_one_ended_credits_it(app: RunningApp) -> None:
    """Cancel subscription 1, buy and cancel subscription 2, reactivate 1 in the portal: ChargeBee bills
    for 1, so the account is on 1's plan, now and after every webhook has arrived."""
    user_id = app.create_user("gus@example.com")
    with app.browser() as client:
        app.sign_in(client, "gus@example.com")
        landing = urlsplit(pay(client, checkout(client, "pro").headers["location"]).headers["location"])
        assert element_texts(client.get(f"/account?{landing.query}").text)["account-plan"] == "Pro"
        portal_url = open_portal(client)
        [first] = portal_subscriptions(client, portal_url)
        portal_action(client, portal_url, "cancel_now", first)
        until(lambda: app.metadata(user_id).public.status == "cancelled")

        # No live subscription, so "Choose Ultra" is a second checkout: a second subscription.
        landing = urlsplit(pay(client, checkout(client, "ultra").headers["location"]).headers["location"])
        assert element_texts(client.get(f"/account?{landing.query}").text)["account-plan"] == "Ultra"
        portal_url = open_portal(client)
        shown = portal_subscriptions(client, portal_url)
        [second] = [subscription for subscription in shown if subscription != first]
        assert sorted(shown) == sorted([first, second])
        portal_action(client, portal_url, "cancel_now", second)
        until(lambda: app.metadata(user_id).public.status == "cancelled")

        reactivated = portal_action(client, portal_url, "reactivate", first)
        assert reactivated.status_code == 303
        ids = element_texts(back_from_portal(client, portal_url).text)
        assert (ids["account-plan"], ids["account-status"], ids["time-left"]) == ("Pro", "Active", "30:00")

    # Every webhook (both subscriptions' whole histories) delivered: the account stays where ChargeBee is.
    until(lambda: not app.chargebee.pending_events)
    final = app.metadata(user_id)
    assert (final.public.plan, final.public.status) == ("pro", "active")
    assert {first: "active", second: "cancelled"} == {
        key: record.status for key, record in final.private.subscriptions.items()
    }


def test_checkout_links_that_are_not_hosted_page_ids_reach_no_chargebee_path(app: RunningApp) -> None:
    user_id = app.create_user("hal@example.com")
    with app.browser() as client:
        app.sign_in(client, "hal@example.com")
        pay(client, checkout(client, "pro").headers["location"])
        until(lambda: not app.chargebee.pending_events)
        for forged in (
            f"../customers/{user_id}",
            "../subscriptions",
            "hp_1/../../portal_sessions",
            "..",
            "%2e%2e%2fcustomers",
        ):
            before = len(app.chargebee_calls())
            page = client.get("/account", params={"id": forged, "state": "succeeded"})
            assert page.status_code == 400, forged
            ids = element_texts(page.text)
            assert ids["billing-problem"].startswith("That checkout link is not one ChargeBee gave out")
            assert ids["account-plan"] == "Pro"  # the account itself is still shown
            assert app.chargebee_calls()[before:] == [], forged
        # A well-formed id is looked up, as a hosted page and nothing else.
        before = len(app.chargebee_calls())
        client.get("/account", params={"id": "hp_made_up", "state": "succeeded"})
        assert [(call.method, call.path) for call in app.chargebee_calls()[before:]] == [
            ("GET", "/hosted_pages/hp_made_up")
        ]
