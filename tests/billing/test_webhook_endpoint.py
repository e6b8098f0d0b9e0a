"""POST /api/webhooks/chargebee on the whole app: who may call it, and what ChargeBee is told to do."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import SANDBOX_CLERK_PREFIX
from billing.plans import PlanCatalogue
from tests.billing.conftest import RunningApp, replace_settings, running_app
from tests.billing.lifecycle import Lifecycle
from tests.live_server import free_port, serve

WEBHOOK = "/api/webhooks/chargebee"


def post_event(app: RunningApp, body: bytes, auth: Any = "configured") -> httpx.Response:
    if auth == "configured":
        auth = (app.settings.chargebee_webhook_username, app.settings.chargebee_webhook_password)
    return httpx.post(
        f"{app.url}{WEBHOOK}",
        content=body,
        auth=auth,
        headers={"content-type": "application/json"},
        timeout=20,
    )


def lifecycle(app: RunningApp, catalogue: PlanCatalogue, user_id: str) -> Lifecycle:
    pro, ultra = (plan.item_price_id or "" for plan in catalogue.paid)
    life = Lifecycle(customer_id=user_id, item_prices=(pro, ultra))
    life.start(pro)
    return life


def test_refuses_callers_without_the_webhook_credentials(app: RunningApp, catalogue: PlanCatalogue) -> None:
    user_id = app.create_user("ada@example.com")
    created = lifecycle(app, catalogue, user_id).bodies[0]

    missing = post_event(app, created, auth=None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Basic")
    wrong_password = post_event(app, created, auth=(app.settings.chargebee_webhook_username, "guess"))
    assert wrong_password.status_code == 401
    wrong_user = post_event(app, created, auth=("admin", app.settings.chargebee_webhook_password))
    assert wrong_user.status_code == 401
    bearer = httpx.post(
        f"{app.url}{WEBHOOK}",
        content=created,
        headers={"authorization": f"Bearer {app.settings.chargebee_webhook_password}"},
    )
    assert bearer.status_code == 401
    # None of them changed anything.
    assert app.metadata(user_id).public.plan == "free"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'{"event_type": "subscription_created"}', b""],
    ids=["broken-json", "array", "no-id", "empty"],
)
def test_malformed_bodies_are_refused(app: RunningApp, body: bytes) -> None:
    response = post_event(app, body)
    assert response.status_code == 400
    assert response.json()["result"] == "malformed"


def test_subscription_event_with_a_broken_subscription_is_refused(app: RunningApp) -> None:
    body = {
        "id": "ev_1",
        "occurred_at": 1,
        "event_type": "subscription_created",
        "content": {"subscription": 5},
    }
    assert post_event(app, json.dumps(body).encode()).status_code == 400


def test_events_apply_once_and_unrelated_ones_are_acknowledged(
    app: RunningApp, catalogue: PlanCatalogue
) -> None:
    user_id = app.create_user("bob@example.com")
    life = lifecycle(app, catalogue, user_id)

    first = post_event(app, life.bodies[0])
    assert (first.status_code, first.json()["result"]) == (200, "applied")
    metadata = app.metadata(user_id)
    assert (metadata.public.plan, metadata.public.status) == ("pro", "active")
    assert metadata.private.customer_id == user_id
    assert list(metadata.private.subscriptions) == [life.subscription["id"]]

    # ChargeBee redelivers: acknowledged, nothing changes.
    again = post_event(app, life.bodies[0])
    assert (again.status_code, again.json()["result"]) == (200, "unchanged")
    assert app.metadata(user_id) == metadata

    unrelated = {
        "id": "ev_x",
        "occurred_at": 1,
        "event_type": "coupon_created",
        "content": {"coupon": {"id": "c"}},
    }
    response = post_event(app, json.dumps(unrelated).encode())
    assert (response.status_code, response.json()["result"]) == (200, "ignored")

    # The private half never reaches the public metadata a browser can read.
    public, private = app.raw_metadata(user_id)
    assert set(public) == {"billing"}
    assert "customer_id" not in json.dumps(public)
    assert list(private["billing"]["subscriptions"]) == [life.subscription["id"]]


def test_events_for_customers_that_are_not_users_are_acknowledged(
    app: RunningApp, catalogue: PlanCatalogue
) -> None:
    # A ChargeBee customer this app did not create (ours are Clerk user ids), and a Clerk-shaped id that
    # is no user: neither can ever apply, and neither is suspicious.
    for customer_id in ("cus_made_in_chargebee", "user_2NotInClerkAtAll0000000000"):
        stranger = lifecycle(app, catalogue, customer_id).bodies[0]
        response = post_event(app, stranger)
        assert (response.status_code, response.json()["result"]) == (200, "ignored")


def test_unknown_item_price_is_acknowledged_without_change(app: RunningApp, catalogue: PlanCatalogue) -> None:
    user_id = app.create_user("cyd@example.com")
    life = Lifecycle(customer_id=user_id, item_prices=("other-product-USD-monthly", "x"))
    life.start("other-product-USD-monthly")
    response = post_event(app, life.bodies[0])
    assert (response.status_code, response.json()["result"]) == (200, "unchanged")
    assert app.metadata(user_id).public.plan == "free"


class FlakyClerk:
    """A real HTTP server in front of the Clerk emulator: forwards while up, answers 503 while down, and
    records every request it is sent (method and path)."""

    def __init__(self) -> None:
        self.target = ""
        self.down = False
        self.refused = 0
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.requests.append((scope["method"], scope["path"]))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.down:
            self.refused += 1
            await send(
                {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": b"upstream connect error"})
            return
        headers = {
            k.decode(): v.decode()
            for k, v in scope["headers"]
            if k.lower() not in (b"host", b"content-length")
        }
        url = (
            self.target
            + scope["path"]
            + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        )
        async with httpx.AsyncClient() as client:
            upstream = await client.request(scope["method"], url, content=body, headers=headers)
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status_code,
                "headers": [
                    (b"content-type", upstream.headers.get("content-type", "application/json").encode())
                ],
            }
        )
        await send({"type": "http.response.body", "body": upstream.content})


def test_clerk_failure_makes_chargebee_retry_and_the_retry_applies(
    tmp_path: Path, catalogue: PlanCatalogue
) -> None:
    flaky = FlakyClerk()
    with serve(flaky, lifespan="off") as proxy_url:
        clerk_via_proxy = replace_settings(clerk_api_url=f"{proxy_url}{SANDBOX_CLERK_PREFIX}")
        with running_app(tmp_path / "state", adjust=clerk_via_proxy) as app:
            flaky.target = app.url
            user_id = app.create_user("dee@example.com")  # straight to the emulator
            life = lifecycle(app, catalogue, user_id)

            flaky.down = True
            refused = post_event(app, life.bodies[0])
            assert refused.status_code == 503
            assert refused.headers["retry-after"]
            assert flaky.refused >= 1
            assert app.metadata(user_id).public.plan == "free"  # nothing half-written

            flaky.down = False
            retried = post_event(app, life.bodies[0])  # ChargeBee's retry of the same event
            assert (retried.status_code, retried.json()["result"]) == (200, "applied")
            assert app.metadata(user_id).public.plan == "pro"


def test_unreachable_clerk_is_a_5xx_too(tmp_path: Path, catalogue: PlanCatalogue) -> None:
    nowhere = replace_settings(clerk_api_url=f"http://127.0.0.1:{free_port()}{SANDBOX_CLERK_PREFIX}")
    with running_app(tmp_path / "state", adjust=nowhere) as app:
        user_id = app.create_user("eve@example.com")
        response = post_event(app, lifecycle(app, catalogue, user_id).bodies[0])
        assert response.status_code == 503
        assert app.metadata(user_id).public.plan == "free"


def edited(body: bytes, **subscription: Any) -> bytes:
    """The event with fields of its subscription snapshot (and `customer` for the customer id) replaced."""
    event = json.loads(body)
    customer = subscription.pop("customer", None)
    if customer is not None:
        event["content"]["customer"]["id"] = customer
    event["content"]["subscription"].update(subscription)
    return json.dumps(event).encode()


def test_backdated_chargebee_events_apply(app: RunningApp, catalogue: PlanCatalogue) -> None:
    user_id = app.create_user("bea@example.com")
    life = lifecycle(app, catalogue, user_id)
    life.act("cancel_backdated")
    for body in life.bodies:
        assert post_event(app, body).status_code == 200
    metadata = app.metadata(user_id)
    assert (metadata.public.plan, metadata.public.status) == ("free", "cancelled")

    before = len(life.bodies)
    life.act("reactivate_backdated")
    applied = post_event(app, life.bodies[before])
    assert json.loads(life.bodies[before])["event_type"] == "subscription_reactivated_with_backdating"
    assert (applied.status_code, applied.json()["result"]) == (200, "applied")
    assert (app.metadata(user_id).public.plan, app.metadata(user_id).public.status) == ("pro", "active")


def test_an_event_whose_customer_and_subscription_disagree_is_refused(
    app: RunningApp, catalogue: PlanCatalogue
) -> None:
    ada, bob = app.create_user("ada2@example.com"), app.create_user("bob2@example.com")
    # Bob's subscription in an event that names Ada as the customer, and the other way round.
    for customer, owner in ((ada, bob), (bob, ada)):
        body = edited(lifecycle(app, catalogue, owner).bodies[0], customer=customer)
        refused = post_event(app, body)
        assert refused.status_code == 422
        assert refused.json()["result"] == "refused"
        assert "different customers" in refused.json()["detail"]
    assert app.metadata(ada).public.plan == "free"
    assert app.metadata(bob).public.plan == "free"
    assert not app.metadata(ada).private.subscriptions
    assert not app.metadata(bob).private.subscriptions


def test_an_impossible_resource_version_is_refused_and_does_not_freeze_the_account(
    app: RunningApp, catalogue: PlanCatalogue
) -> None:
    user_id = app.create_user("cat@example.com")
    life = lifecycle(app, catalogue, user_id)
    assert post_event(app, life.bodies[0]).json()["result"] == "applied"
    life.act("cancel")
    cancel = life.bodies[-1]
    now_ms = int(time.time() * 1000)
    for version in (2**62, now_ms + 3 * 86_400_000):
        forged = edited(cancel, resource_version=version)
        refused = post_event(app, forged)
        assert (refused.status_code, refused.json()["result"]) == (422, "refused")
        assert app.metadata(user_id).public.status == "active"
    # The genuine cancellation still applies: nothing was frozen at a version from the far future.
    applied = post_event(app, cancel)
    assert (applied.status_code, applied.json()["result"]) == (200, "applied")
    assert app.metadata(user_id).public.status == "cancelled"


def test_ids_that_would_reach_a_clerk_path_are_refused_before_any_clerk_call(
    tmp_path: Path, catalogue: PlanCatalogue
) -> None:
    recorder = FlakyClerk()
    with serve(recorder, lifespan="off") as proxy_url:
        clerk_via_proxy = replace_settings(clerk_api_url=f"{proxy_url}{SANDBOX_CLERK_PREFIX}")
        with running_app(tmp_path / "state", adjust=clerk_via_proxy) as app:
            recorder.target = app.url
            victim = app.create_user("dan@example.com")
            for customer in ("../users", "user_x/../../users", "user_ok?limit=500"):
                body = edited(
                    lifecycle(app, catalogue, victim).bodies[0], customer=customer, customer_id=customer
                )
                refused = post_event(app, body)
                assert (refused.status_code, refused.json()["result"]) == (422, "refused"), customer
            # Only what the test itself asked: no user list, no request for anyone else.
            assert not recorder.requests


def test_schema_1_metadata_is_migrated_by_the_next_event(app: RunningApp, catalogue: PlanCatalogue) -> None:
    user_id = app.create_user("eli@example.com")
    life = lifecycle(app, catalogue, user_id)
    created = json.loads(life.bodies[0])["content"]["subscription"]

    async def store_schema_1(clerk: Any) -> None:
        await clerk.users.update_metadata_async(
            user_id=user_id,
            public_metadata={
                "billing": {
                    "schema_version": 1,
                    "plan": "pro",
                    "status": "active",
                    "seconds_used": 300,
                    "period_start": created["current_term_start"],
                    "period_end": created["current_term_end"],
                }
            },
            private_metadata={
                "billing": {
                    "schema_version": 1,
                    "customer_id": user_id,
                    "subscription_id": created["id"],
                    "subscription_created_at": created["created_at"],
                    "subscription_deleted": False,
                    "resource_version": created["resource_version"],
                    "term_start": created["current_term_start"],
                },
                "other_feature": {"kept": True},
            },
        )

    app.clerk(store_schema_1)
    life.act("schedule_cancel")
    applied = post_event(app, life.bodies[-1])
    assert (applied.status_code, applied.json()["result"]) == (200, "applied")
    public, private = app.raw_metadata(user_id)
    assert public["billing"]["schema_version"] == private["billing"]["schema_version"] == 2
    assert public["billing"]["status"] == "non_renewing"
    assert public["billing"]["seconds_used"] == 300  # the same term: usage kept
    retired = {
        "subscription_id",
        "subscription_created_at",
        "subscription_deleted",
        "resource_version",
        "term_start",
    }
    assert not retired & set(private["billing"])
    record = private["billing"]["subscriptions"][created["id"]]
    assert (record["status"], record["plan"], record["created_at"]) == (
        "non_renewing",
        "pro",
        created["created_at"],
    )
    assert private["other_feature"] == {"kept": True}
