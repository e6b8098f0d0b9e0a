"""The account store's Clerk calls: a burst of cache misses waits its turn in the store, never more than
`max_concurrent_calls` in flight, and every caller still gets its own account."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.types import ASGIApp, Receive, Scope, Send

from app.clerk import create_clerk_client
from billing.accounts import AccountStore
from billing.metadata import BillingMetadata
from billing.plans import PlanId
from sandbox.clerk_emulator import API_PATH, ClerkEmulator
from tests.live_server import serve

pytestmark = pytest.mark.filterwarnings(r"ignore:.*\*\* DEPRECATED \*\*:DeprecationWarning")
SECRET = "sk_test_account_store_calls"


class InFlight:
    """ASGI middleware counting the requests the emulator is serving at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def __call__(self, app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                await asyncio.sleep(0.01)  # a Clerk that takes a moment, so calls overlap
                await app(scope, receive, send)
            finally:
                self.now -= 1

        return middleware


def run_burst(tmp_path: Path, *, limit: int, users: int, writes: bool) -> tuple[InFlight, list[Any]]:
    in_flight = InFlight()
    emulator = ClerkEmulator(tmp_path / "clerk.json", SECRET, metadata_writes_per_window=100)
    app = Litestar(route_handlers=[emulator.router], middleware=[in_flight])

    async def burst(api_url: str) -> list[Any]:
        async with create_clerk_client(SECRET, api_url) as clerk:
            ids = [
                (await clerk.users.create_async(email_address=[f"burst{i}@example.com"])).id
                for i in range(users)
            ]
            in_flight.most = 0
            store = AccountStore(clerk, max_concurrent_calls=limit)
            if writes:

                def plan(account: Any) -> BillingMetadata:
                    metadata = account.metadata
                    return msgspec.structs.replace(
                        metadata, public=msgspec.structs.replace(metadata.public, plan=PlanId.PRO)
                    )

                return await asyncio.gather(*(store.update(user_id, plan) for user_id in ids))
            accounts = await asyncio.gather(*(store.get(user_id) for user_id in ids))
            return [(user_id, account) for user_id, account in zip(ids, accounts, strict=True)]

    with serve(app) as base_url:
        return in_flight, asyncio.run(burst(base_url + API_PATH))


def test_a_burst_of_reads_keeps_at_most_the_limit_in_flight_and_answers_everyone(tmp_path: Path) -> None:
    in_flight, results = run_burst(tmp_path, limit=4, users=30, writes=False)
    assert 1 < in_flight.most <= 4
    assert all(account.user_id == user_id for user_id, account in results)
    assert all(account.email == f"burst{i}@example.com" for i, (_, account) in enumerate(results))


def test_a_burst_of_writes_keeps_at_most_the_limit_in_flight_and_lands_every_write(tmp_path: Path) -> None:
    in_flight, accounts = run_burst(tmp_path, limit=3, users=20, writes=True)
    assert 1 < in_flight.most <= 3
    assert [account.metadata.public.plan for account in accounts] == [PlanId.PRO] * 20
