"""The vendors' id formats (billing/ids.py), and the Clerk side of them: an id that is not a Clerk user
id never becomes a Clerk request."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.clerk import create_clerk_client
from app.settings import SANDBOX_CLERK_PREFIX
from billing.accounts import AccountStore, InvalidUserId, UnknownUser
from billing.ids import InvalidId, chargebee_id, clerk_user_id, hosted_page_id
from tests.billing.conftest import replace_settings, run_async, running_app
from tests.billing.test_webhook_endpoint import FlakyClerk
from tests.live_server import serve

PATHS = ["../users", "user_x/../../users", "user_x?limit=500", "user_x#", "user_ä", "user_", "", "..", "."]


def test_vendor_id_formats() -> None:
    assert clerk_user_id("user_2NNEqL2nrIRdJ194ndJqAHwEfxC") == "user_2NNEqL2nrIRdJ194ndJqAHwEfxC"
    assert chargebee_id("AzZjGnTP0GMN51MH") == "AzZjGnTP0GMN51MH"
    assert chargebee_id("cbdemo_ada.lovelace@example.com+1") == "cbdemo_ada.lovelace@example.com+1"
    assert hosted_page_id("__test__8l1rRVyhRLwcpW4HlhsUSvnsDSI5hfpfS")
    for bad in PATHS:
        with pytest.raises(InvalidId):
            clerk_user_id(bad)
    for bad in ("../x", "a/b", ".", "..", "a" * 51, "", "a b", "a%2Fb", "a\\b"):
        with pytest.raises(InvalidId):
            chargebee_id(bad)
    for bad in ("../customers/x", "a.b", "a" * 101, ""):
        with pytest.raises(InvalidId):
            hosted_page_id(bad)


def test_the_account_store_sends_no_request_for_an_id_that_is_not_a_clerk_user_id(tmp_path: Path) -> None:
    recorder = FlakyClerk()
    with serve(recorder, lifespan="off") as proxy_url:
        clerk_via_proxy = replace_settings(clerk_api_url=f"{proxy_url}{SANDBOX_CLERK_PREFIX}")
        with running_app(tmp_path / "state", adjust=clerk_via_proxy) as app:
            recorder.target = app.url
            real = app.create_user("fox@example.com")

            async def main() -> list[str]:
                outcomes = []
                async with create_clerk_client(
                    app.settings.clerk_secret_key, app.settings.clerk_api_url
                ) as clerk:
                    store = AccountStore(clerk)
                    for bad in PATHS:
                        for call in (store.get(bad, fresh=True), store.update(bad, lambda _: None)):
                            try:
                                await call
                            except UnknownUser as error:  # how callers already treat "no such user"
                                outcomes.append(type(error).__name__)
                    assert recorder.requests == []
                    account = await store.get(real, fresh=True)
                    outcomes.append(account.user_id)
                return outcomes

            assert run_async(main) == [InvalidUserId.__name__] * (2 * len(PATHS)) + [real]
            assert recorder.requests == [("GET", f"{SANDBOX_CLERK_PREFIX}/users/{real}")]
