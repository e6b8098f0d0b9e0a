"""`GET /account?returned=portal`: what a return from the billing portal costs, and who can cause it.

Each refresh is a ChargeBee list call and a Clerk write; the sandbox ChargeBee's API log shows every call
the app makes, so these tests count them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.settings import SANDBOX_CLERK_PREFIX
from app.subscriptions import PORTAL_REFRESH_INTERVAL_S, portal_return_token, portal_return_valid
from tests.billing.conftest import RunningApp, replace_settings, running_app
from tests.billing.test_billing_pages import (
    checkout,
    element_texts,
    open_portal,
    pay,
    portal_action,
    portal_back_link,
    until,
)


def subscription_lists(app: RunningApp, since: int = 0) -> int:
    return sum(
        1 for call in app.chargebee_calls()[since:] if (call.method, call.path) == ("GET", "/subscriptions")
    )


def subscriber(app: RunningApp, client: httpx.Client, email: str) -> str:
    """Sign in as a Pro subscriber who is in the portal; returns the portal's URL."""
    app.sign_in(client, email)
    pay(client, checkout(client, "pro").headers["location"])
    until(lambda: not app.chargebee.pending_events)
    return open_portal(client)


@pytest.fixture
def signed_in(app: RunningApp) -> Iterator[httpx.Client]:
    with app.browser() as client:
        yield client


def test_a_return_refreshes_once_however_often_it_is_loaded(app: RunningApp, signed_in: httpx.Client) -> None:
    portal_url = subscriber(app, signed_in, "ann@example.com")
    portal_action(signed_in, portal_url, "cancel_end_of_term")
    back = portal_back_link(signed_in, portal_url)
    assert parse_qs(urlsplit(back).query)["returned"] == ["portal"]

    before = len(app.chargebee_calls())
    first = signed_in.get(back)
    assert first.status_code == 200
    assert "billing-notice" not in element_texts(first.text)
    for _ in range(5):
        again = signed_in.get(back)
        assert element_texts(again.text)["billing-notice"].startswith("Changes you just made")
    assert subscription_lists(app, before) == 1


def test_a_return_link_is_good_only_for_its_user_and_unchanged(
    app: RunningApp, signed_in: httpx.Client
) -> None:
    portal_url = subscriber(app, signed_in, "cal@example.com")
    mine = portal_back_link(signed_in, portal_url)
    token = parse_qs(urlsplit(mine).query)["t"][0]
    issued, _, mac = token.partition(".")
    other_user = app.create_user("dot@example.com")
    forged = [
        "/account?returned=portal",  # what another site can link to
        "/account?returned=portal&t=",
        f"/account?returned=portal&t={issued}.{mac[:-2]}xx",
        f"/account?returned=portal&t={int(issued) + 1}.{mac}",
        "/account?returned=portal&t="
        + portal_return_token(app.settings.csrf_secret, other_user, int(time.time())),
        "/account?returned=portal&t=" + portal_return_token("not-the-secret", "user_x", int(time.time())),
    ]
    before = len(app.chargebee_calls())
    for link in forged:
        page = signed_in.get(link)
        assert page.status_code == 200, link
        assert element_texts(page.text)["account-plan"] == "Pro"
    assert subscription_lists(app, before) == 0
    # The genuine link still works after all that.
    signed_in.get(mine)
    assert subscription_lists(app, before) == 1


def test_return_tokens_expire_and_name_one_user() -> None:
    now = 1_800_000_000
    token = portal_return_token("secret", "user_a", now)
    assert portal_return_valid("secret", "user_a", token, now + 60)
    assert not portal_return_valid("secret", "user_b", token, now + 60)
    assert not portal_return_valid("other", "user_a", token, now + 60)
    assert not portal_return_valid("secret", "user_a", token, now + 7 * 3600)
    assert not portal_return_valid(
        "secret", "user_a", portal_return_token("secret", "user_a", now + 600), now
    )
    for garbage in (None, "", ".", "abc.def", f"{now}", f"{now}.", "9" * 40 + ".x"):
        assert not portal_return_valid("secret", "user_a", garbage, now)


def test_the_interval_is_kept_in_the_account_and_holds_across_app_processes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running_app(state) as first, first.browser() as client:
        portal_url = subscriber(first, client, "eve@example.com")
        back = portal_back_link(client, portal_url)
        user_id = first.create_user("eve@example.com")
        # More processes of the same deployment: the same secrets and vendors, each with its own memory.
        same_vendors = replace_settings(
            app_url=first.settings.app_url,
            clerk_api_url=f"{first.url}{SANDBOX_CLERK_PREFIX}",
            chargebee_domain=first.settings.chargebee_domain,
        )
        before = len(first.chargebee_calls())
        assert client.get(back).status_code == 200
        assert subscription_lists(first, before) == 1
        with running_app(state, adjust=same_vendors) as second:
            for _ in range(3):
                page = client.get(f"{second.url}{back}")
                assert element_texts(page.text)["billing-notice"].startswith("Changes you just made")
            assert subscription_lists(first, before) == 1
            assert subscription_lists(second) == 0

        # Once the interval has passed, as the account records it, a return refreshes again, in any process.
        stamped = first.metadata(user_id).private.refreshed_at
        assert stamped is not None

        async def age(clerk: Any) -> None:
            await clerk.users.update_metadata_async(
                user_id=user_id,
                private_metadata={"billing": {"refreshed_at": stamped - PORTAL_REFRESH_INTERVAL_S - 1}},
            )

        first.clerk(age)
        with running_app(state, adjust=same_vendors) as third:
            page = client.get(f"{third.url}{back}")
            assert "billing-notice" not in element_texts(page.text)
            assert subscription_lists(first, before) == 2
            assert first.metadata(user_id).private.refreshed_at >= stamped
