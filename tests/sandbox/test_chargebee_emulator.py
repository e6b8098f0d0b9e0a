"""The sandbox ChargeBee emulator, driven the way the app drives ChargeBee: the official SDK (async client)
over a real socket, with webhooks delivered to a real HTTP endpoint."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from chargebee import APIError, Chargebee
from litestar import Litestar, Request, Response, post

from app.settings import SANDBOX_CHARGEBEE_PREFIX, Settings
from app.wiring import chargebee_config, plan_catalogue
from billing.chargebee_client import (
    ChargebeeRejected,
    create_chargebee_client,
    ensure_customer,
    live_subscription,
    open_checkout,
    open_portal,
    recent_subscriptions,
    retrieve_checkout,
)
from billing.ids import InvalidId
from billing.metadata import BillingMetadata
from billing.plans import PlanCatalogue
from billing.webhooks import apply_event, parse_event
from sandbox.chargebee_emulator import ChargebeeEmulator, SandboxItemPrice
from tests.billing.conftest import run_async, sandbox_settings
from tests.live_server import free_port, serve

T = TypeVar("T")
HOOK_USER, HOOK_PASSWORD = "chargebee", "hook-secret"


@dataclass
class Receiver:
    """The other end of the webhooks: records every delivery; refuses each event `refusals` times first."""

    refusals: int = 0
    deliveries: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for _, status, body in self.deliveries if status == "ok"]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.accepted()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.accepted())} of {count} events arrived: {self.deliveries}"
                )
            time.sleep(0.02)
        return self.accepted()


@dataclass
class Site:
    settings: Settings
    base_url: str
    receiver: Receiver
    store_path: Path
    emulator: ChargebeeEmulator

    def call(self, body: Callable[[Chargebee], Awaitable[T]]) -> T:
        """Run `body` with the app's SDK client on a fresh event loop, as a request handler would."""

        async def main() -> T:
            return await body(create_chargebee_client(chargebee_config(self.settings)))

        return run_async(main)


def build_site_app(emulator: ChargebeeEmulator, receiver: Receiver) -> Litestar:
    @post("/hooks", status_code=200)
    async def hooks(request: Request[Any, Any, Any]) -> Response[str]:
        expected = "Basic " + base64.b64encode(f"{HOOK_USER}:{HOOK_PASSWORD}".encode()).decode()
        body = json.loads(await request.body())
        with receiver.lock:
            if request.headers.get("authorization") != expected:
                receiver.deliveries.append((time.monotonic(), "unauthorized", body))
                return Response("no", status_code=401)
            refused = sum(1 for _, status, seen in receiver.deliveries if seen["id"] == body["id"])
            if refused < receiver.refusals:
                receiver.deliveries.append((time.monotonic(), "failed", body))
                return Response("down", status_code=500)
            receiver.deliveries.append((time.monotonic(), "ok", body))
        return Response("ok")

    @asynccontextmanager
    async def run_emulator(_: Litestar) -> AsyncIterator[None]:
        emulator.start()
        yield
        await emulator.aclose()

    return Litestar(route_handlers=[emulator.router, hooks], lifespan=[run_emulator])


def make_emulator(settings: Settings, store_path: Path, catalogue: PlanCatalogue) -> ChargebeeEmulator:
    return ChargebeeEmulator(
        store_path,
        mount_path=SANDBOX_CHARGEBEE_PREFIX,
        api_key=settings.chargebee_api_key,
        public_url=settings.app_url,
        webhook_url=f"{settings.internal_url}/hooks",
        webhook_username=HOOK_USER,
        webhook_password=HOOK_PASSWORD,
        item_prices=[
            SandboxItemPrice(
                id=plan.item_price_id or "", name=plan.name, price_display=plan.price_display, unit_price=1200
            )
            for plan in catalogue.paid
        ],
        retry_base_s=0.05,
    )


@contextmanager
def running_site(
    settings: Settings, store_path: Path, receiver: Receiver, catalogue: PlanCatalogue
) -> Iterator[Site]:
    emulator = make_emulator(settings, store_path, catalogue)
    with serve(build_site_app(emulator, receiver), port=settings.port) as base_url:
        yield Site(settings, base_url, receiver, store_path, emulator)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return sandbox_settings(tmp_path / "state", STYLECAST_PORT=str(free_port()))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> PlanCatalogue:
    """The plans a sandbox deployment sells through the emulator."""
    return plan_catalogue(sandbox_settings(tmp_path_factory.mktemp("catalogue")))


@pytest.fixture
def site(settings: Settings, tmp_path: Path, catalogue: PlanCatalogue) -> Iterator[Site]:
    with running_site(settings, tmp_path / "chargebee.json", Receiver(), catalogue) as running:
        yield running


def pay(site: Site, checkout_url: str) -> httpx.Response:
    """The buyer presses Pay on the hosted checkout page."""
    return httpx.post(f"{checkout_url}/pay", follow_redirects=False)


def buy(site: Site, catalogue: PlanCatalogue, user_id: str, plan: str = "pro") -> str:
    async def body(cb: Chargebee) -> str:
        await ensure_customer(cb, user_id, f"{user_id}@example.com")
        return await open_checkout(
            cb,
            customer_id=user_id,
            plan=catalogue.get(plan),
            redirect_url="http://app.test/account?from=checkout",
            cancel_url="http://app.test/pricing",
        )

    url = site.call(body)
    response = pay(site, url)
    assert response.status_code == 303
    return response.headers["location"]


def test_checkout_creates_the_subscription_and_announces_it(site: Site, catalogue: PlanCatalogue) -> None:
    async def prepare(cb: Chargebee) -> tuple[str, str]:
        first = await ensure_customer(cb, "user_ada", "ada@example.com")
        again = await ensure_customer(cb, "user_ada", "ada@example.com")  # retrieves, does not duplicate
        assert first == again == "user_ada"
        customer = await cb.Customer.retrieve("user_ada")
        assert customer.customer.email == "ada@example.com"
        url = await open_checkout(
            cb,
            customer_id="user_ada",
            plan=catalogue.get("pro"),
            redirect_url="http://app.test/account?from=checkout",
            cancel_url="http://app.test/pricing",
        )
        return url, url.rsplit("/", 1)[-1]

    url, page_id = site.call(prepare)
    assert url == f"{site.settings.app_url}{SANDBOX_CHARGEBEE_PREFIX}/checkout/{page_id}"
    assert site.call(lambda cb: retrieve_checkout(cb, page_id)).state == "created"

    response = pay(site, url)
    assert response.status_code == 303
    assert (
        response.headers["location"] == f"http://app.test/account?from=checkout&id={page_id}&state=succeeded"
    )
    assert pay(site, url).headers["location"] == response.headers["location"]  # paying twice is a no-op

    result = site.call(lambda cb: retrieve_checkout(cb, page_id))
    assert (result.state, result.customer_id) == ("succeeded", "user_ada")
    assert result.subscription is not None
    assert result.subscription.status == "active"
    assert [item.item_price_id for item in result.subscription.subscription_items] == [
        catalogue.get("pro").item_price_id
    ]
    live = site.call(lambda cb: live_subscription(cb, "user_ada"))
    assert live is not None
    assert live.id == result.subscription.id

    events = site.receiver.wait_for(3)
    assert [event["event_type"] for event in events] == [
        "subscription_created",
        "invoice_generated",
        "payment_succeeded",
    ]
    created = events[0]
    assert created["api_version"] == "v2"
    assert created["object"] == "event"
    assert created["content"]["customer"]["id"] == "user_ada"
    subscription = created["content"]["subscription"]
    assert subscription["id"] == result.subscription.id
    assert abs(subscription["resource_version"] - time.time() * 1000) < 60_000  # milliseconds
    assert subscription["current_term_end"] > subscription["current_term_start"]
    assert events[2]["content"]["transaction"]["status"] == "success"
    # Only one subscription exists even though Pay was pressed twice.
    assert len({event["content"]["subscription"]["id"] for event in events}) == 1


def test_failed_deliveries_are_retried_with_growing_delays(site: Site, catalogue: PlanCatalogue) -> None:
    site.receiver.refusals = 3
    buy(site, catalogue, "user_bob")
    events = site.receiver.wait_for(3)
    assert [event["event_type"] for event in events] == [
        "subscription_created",
        "invoice_generated",
        "payment_succeeded",
    ]
    with site.receiver.lock:
        first_id = site.receiver.deliveries[0][2]["id"]
        attempts = [at for at, _, body in site.receiver.deliveries if body["id"] == first_id]
    assert len(attempts) == 4  # three refusals, then accepted
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # Each retry waits at least its doubling delay (0.05, 0.1, 0.2 s); a loaded machine only adds to them,
    # so comparing two noisy gaps with each other would prove nothing.
    assert [gap >= 0.05 * 2**index - 0.005 for index, gap in enumerate(gaps)] == [True, True, True], gaps


def test_api_errors_carry_chargebee_error_codes(site: Site, catalogue: PlanCatalogue) -> None:
    async def body(cb: Chargebee) -> dict[str, Any]:
        outcomes: dict[str, Any] = {}
        try:
            await open_checkout(
                cb,
                customer_id="nobody",
                plan=catalogue.get("pro"),
                redirect_url="http://a.test/",
                cancel_url="http://a.test/",
            )
        except ChargebeeRejected as error:
            outcomes["unknown customer"] = (error.http_status_code, error.api_error_code)
        await cb.Customer.create({"id": "user_cyd"})
        try:
            await cb.Customer.create({"id": "user_cyd"})
        except APIError as error:
            outcomes["duplicate"] = (error.http_status_code, error.api_error_code, error.param)
        try:
            await cb.HostedPage.checkout_new_for_items(
                {"customer": {"id": "user_cyd"}, "subscription_items": [{"item_price_id": "no-such-price"}]}
            )
        except APIError as error:
            outcomes["unknown price"] = (error.http_status_code, error.api_error_code)
        try:
            await cb.Subscription.retrieve("sub_missing")
        except APIError as error:
            outcomes["missing subscription"] = (error.http_status_code, error.api_error_code)
        return outcomes

    assert site.call(body) == {
        "unknown customer": (404, "resource_not_found"),
        "duplicate": (400, "duplicate_entry", "id"),
        "unknown price": (404, "resource_not_found"),
        "missing subscription": (404, "resource_not_found"),
    }

    async def wrong_key(_: Chargebee) -> tuple[int, str]:
        client = Chargebee(
            api_key="test_wrong_key",
            site=site.settings.chargebee_site,
            chargebee_domain=site.settings.chargebee_domain,
            protocol="http",
            use_async_client=True,
        )
        try:
            await ensure_customer(client, "user_ada", None)
        except ChargebeeRejected as error:
            return error.http_status_code, str(error.api_error_code)
        raise AssertionError("a wrong API key was accepted")

    assert site.call(wrong_key) == (401, "api_authentication_failed")


def test_subscription_lifecycle_events_fold_into_metadata(site: Site, catalogue: PlanCatalogue) -> None:
    buy(site, catalogue, "user_dee", "pro")
    subscription_id = site.receiver.wait_for(3)[0]["content"]["subscription"]["id"]
    advance = f"{site.base_url}{SANDBOX_CHARGEBEE_PREFIX}/api/v2/subscriptions/{subscription_id}/advance_term"
    auth = (site.settings.chargebee_api_key, "")

    async def upgrade(cb: Chargebee) -> str:
        changed = await cb.Subscription.update_for_items(
            subscription_id, {"subscription_items": [{"item_price_id": catalogue.get("ultra").item_price_id}]}
        )
        return changed.subscription.status

    assert site.call(upgrade) == "active"
    renewed = httpx.post(advance, auth=auth, data={"fail_payment": "true"})
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["subscription"]["due_invoices_count"] == 1

    async def schedule_cancel(cb: Chargebee) -> str:
        return (
            await cb.Subscription.cancel_for_items(subscription_id, {"end_of_term": True})
        ).subscription.status

    assert site.call(schedule_cancel) == "non_renewing"
    ended = httpx.post(advance, auth=auth)
    assert ended.json()["subscription"]["status"] == "cancelled"
    assert httpx.post(advance, auth=auth).json()["api_error_code"] == "invalid_state_for_request"
    assert site.call(lambda cb: live_subscription(cb, "user_dee")) is None

    async def reactivate(cb: Chargebee) -> int:
        return (await cb.Subscription.reactivate(subscription_id)).subscription.current_term_start

    term_start = site.call(reactivate)

    expected = [
        "subscription_created",
        "invoice_generated",
        "payment_succeeded",
        "subscription_changed",
        "subscription_renewed",
        "invoice_generated",
        "payment_failed",
        "subscription_cancellation_scheduled",
        "subscription_cancelled",
        "subscription_reactivated",
        "invoice_generated",
        "payment_succeeded",
    ]
    events = site.receiver.wait_for(len(expected))
    assert [event["event_type"] for event in events] == expected
    versions = [event["content"]["subscription"]["resource_version"] for event in events]
    assert versions == sorted(versions)

    metadata = BillingMetadata()
    for raw in reversed(events):  # worst-case order
        outcome = apply_event(metadata, parse_event(json.dumps(raw).encode()), catalogue)
        metadata = outcome.metadata or metadata
    assert (metadata.public.plan, metadata.public.status) == ("ultra", "active")
    assert metadata.public.period_start == term_start
    assert list(metadata.private.subscriptions) == [subscription_id]
    assert metadata.public.payment_due is False  # cancelling wrote off the failed invoice


def test_portal_session_points_at_the_sandbox_portal(site: Site, catalogue: PlanCatalogue) -> None:
    buy(site, catalogue, "user_eve")
    url = site.call(
        lambda cb: open_portal(cb, customer_id="user_eve", redirect_url="http://app.test/account")
    )
    assert url.startswith(f"{site.settings.app_url}{SANDBOX_CHARGEBEE_PREFIX}/portal/")

    async def unknown(cb: Chargebee) -> str | None:
        try:
            await open_portal(cb, customer_id="nobody", redirect_url="http://app.test/account")
        except ChargebeeRejected as error:
            return error.api_error_code
        return None

    assert site.call(unknown) == "resource_not_found"


def test_state_and_undelivered_events_survive_a_restart(
    settings: Settings, tmp_path: Path, catalogue: PlanCatalogue
) -> None:
    store = tmp_path / "chargebee.json"
    down = Receiver(refusals=10_000)
    with running_site(settings, store, down, catalogue) as site:
        buy(site, catalogue, "user_fay")
        deadline = time.monotonic() + 5
        while not down.deliveries and time.monotonic() < deadline:
            time.sleep(0.02)
    assert down.deliveries, "no delivery was attempted"
    assert not down.accepted()
    assert oct(store.stat().st_mode & 0o777) == "0o600"

    up = Receiver()
    with running_site(settings, store, up, catalogue) as site:
        live = site.call(lambda cb: live_subscription(cb, "user_fay"))
        assert live is not None
        assert live.status == "active"
        events = up.wait_for(3)
        # Retries reorder deliveries, as with ChargeBee; what matters is that none is lost.
        assert sorted(event["event_type"] for event in events) == [
            "invoice_generated",
            "payment_succeeded",
            "subscription_created",
        ]


def test_backdated_cancel_and_reactivation_announce_chargebee_s_backdating_events(
    site: Site, catalogue: PlanCatalogue
) -> None:
    buy(site, catalogue, "user_gil")
    created = site.receiver.wait_for(3)[0]["content"]["subscription"]
    subscription_id, start = created["id"], created["current_term_start"]
    time.sleep(2)  # so that a moment in the current term has passed
    now = int(time.time())

    async def backdate(cb: Chargebee) -> dict[str, Any]:
        outcomes: dict[str, Any] = {}
        for name, params in (
            ("before the term", {"cancel_option": "specific_date", "cancel_at": now - 40 * 86_400}),
            ("in the future", {"cancel_option": "specific_date", "cancel_at": now + 3600}),
        ):
            try:
                await cb.Subscription.cancel_for_items(subscription_id, params)
            except APIError as error:
                outcomes[name] = (error.http_status_code, error.api_error_code, error.param)
        cancelled = await cb.Subscription.cancel_for_items(
            subscription_id, {"cancel_option": "specific_date", "cancel_at": start + 1}
        )
        outcomes["cancelled"] = (cancelled.subscription.status, cancelled.subscription.cancelled_at)
        reactivated = await cb.Subscription.reactivate(subscription_id, {"reactivate_from": start + 2})
        outcomes["reactivated"] = (
            reactivated.subscription.status,
            reactivated.subscription.current_term_start,
        )
        return outcomes

    assert site.call(backdate) == {
        "before the term": (400, "param_wrong_value", "cancel_at"),
        "in the future": (400, "param_wrong_value", "cancel_at"),
        "cancelled": ("cancelled", start + 1),
        "reactivated": ("active", start + 2),
    }
    events = site.receiver.wait_for(7)
    assert [event["event_type"] for event in events[3:]] == [
        "subscription_canceled_with_backdating",
        "subscription_reactivated_with_backdating",
        "invoice_generated_with_backdating",
        "payment_succeeded",
    ]
    # Real ChargeBee event types, which the app handles, in the order that folds to "active".
    metadata = BillingMetadata()
    for raw in reversed(events):
        metadata = (
            apply_event(metadata, parse_event(json.dumps(raw).encode()), catalogue).metadata or metadata
        )
    assert (metadata.public.plan, metadata.public.status, metadata.public.period_start) == (
        "pro",
        "active",
        start + 2,
    )


def test_subscriptions_list_by_latest_change_and_the_api_log_records_each_call(
    site: Site, catalogue: PlanCatalogue
) -> None:
    buy(site, catalogue, "user_hop")
    first = site.receiver.wait_for(3)[0]["content"]["subscription"]["id"]
    site.call(lambda cb: cb.Subscription.cancel_for_items(first, {}))
    buy(site, catalogue, "user_hop", "ultra")
    second = site.receiver.wait_for(7)[-1]["content"]["subscription"]["id"]
    time.sleep(1.1)  # updated_at is in seconds
    site.call(lambda cb: cb.Subscription.reactivate(first))

    by_change = site.call(lambda cb: recent_subscriptions(cb, "user_hop", 8))
    assert [sub.id for sub in by_change] == [first, second]

    async def unsupported(cb: Chargebee) -> str | None:
        try:
            await cb.Subscription.list({"sort_by": {"desc": "status"}})
        except APIError as error:
            return error.param
        return None

    assert site.call(unsupported) == "sort_by"
    emulator_log = [(call.method, call.path) for call in site.emulator.api_log]
    assert ("GET", "/subscriptions") in emulator_log
    assert ("POST", f"/subscriptions/{first}/reactivate") in emulator_log
    assert ("POST", "/customers") in emulator_log


@pytest.mark.parametrize(
    "bad", ["../customers/user_ada", "..", "user_ada/../../subscriptions", "a" * 101, ""]
)
def test_ids_that_are_not_chargebee_ids_never_reach_the_api(site: Site, bad: str) -> None:
    async def calls(cb: Chargebee) -> list[str]:
        refused = []
        for name, call in (
            ("customer", lambda: ensure_customer(cb, bad, None)),
            ("hosted page", lambda: retrieve_checkout(cb, bad)),
            ("subscriptions", lambda: recent_subscriptions(cb, bad, 8)),
        ):
            try:
                await call()
            except InvalidId:
                refused.append(name)
        return refused

    assert site.call(calls) == ["customer", "hosted page", "subscriptions"]
    assert list(site.emulator.api_log) == []
