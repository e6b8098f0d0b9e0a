"""The ChargeBee calls Stylecast makes, through the official SDK's async client.

The same code talks to `https://{site}.chargebee.com/api/v2` in live mode and to the emulator mounted in
our own process in sandbox mode; only the site, domain, protocol and key differ (`ChargebeeConfig`, which
the web app builds from its settings).
Every call is awaited on the SDK's httpx.AsyncClient: a synchronous call here would stall the event loop,
and in sandbox mode it would deadlock against the emulator served by that same loop.

Ids that go into a URL path are checked against ChargeBee's id formats first (billing/ids.py): the SDK
leaves `/` and `.` in them, so `HostedPage.retrieve("../customers/x")` would fetch a customer instead.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx
import msgspec
from chargebee import APIError, Chargebee

from billing import ids
from billing.plans import Plan
from billing.statuses import LIVE_STATUSES
from billing.webhooks import SubscriptionSnapshot

# A checkout or portal click waits on these; ChargeBee's own defaults (30 s connect, 80 s read) would
# leave a user staring at a spinner long after they gave up.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 30


@dataclass(frozen=True, kw_only=True)
class ChargebeeConfig:
    """Where the ChargeBee site is and how to sign in to it. The SDK builds its endpoint as
    "{protocol}://{site}.{domain}/api/v2"."""

    site: str
    api_key: str = field(repr=False)
    domain: str
    protocol: Literal["http", "https"]


class ChargebeeUnavailable(Exception):
    """ChargeBee did not answer usefully (network failure, timeout, 5xx, or a non-ChargeBee reply)."""


class ChargebeeRejected(Exception):
    """ChargeBee answered with an API error (4xx): the request itself was wrong or not allowed."""

    def __init__(self, error: APIError) -> None:
        super().__init__(f"ChargeBee {error.http_status_code} {error.api_error_code}: {error}")
        self.api_error_code: str | None = error.api_error_code
        self.http_status_code: int = int(error.http_status_code or 0)
        self.param: str | None = error.param


class CheckoutResult(msgspec.Struct, frozen=True, kw_only=True):
    """A hosted checkout page read back after ChargeBee redirected the buyer to us."""

    id: str
    state: str
    customer_id: str | None
    subscription: SubscriptionSnapshot | None


def create_chargebee_client(config: ChargebeeConfig) -> Chargebee:
    if config.protocol == "http":
        # The SDK picks http over https only when this class-wide flag is off (an instance attribute is
        # ignored). Only the sandbox emulator on loopback speaks plain http; live mode never gets here.
        Chargebee.verify_ca_certs = False
    return Chargebee(
        api_key=config.api_key,
        site=config.site,
        chargebee_domain=config.domain,
        protocol=config.protocol,
        connection_time_out=CONNECT_TIMEOUT_S,
        read_time_out=READ_TIMEOUT_S,
        use_async_client=True,
    )


_T = TypeVar("_T")


async def _call(request: Awaitable[_T]) -> _T:
    """Await an SDK call, turning its many failure shapes into our two exceptions."""
    try:
        return await request
    except APIError as error:
        if int(error.http_status_code or 0) >= 500 or error.http_status_code == 429:
            raise ChargebeeUnavailable(
                f"ChargeBee {error.http_status_code} {error.api_error_code}"
            ) from error
        raise ChargebeeRejected(error) from error
    except httpx.HTTPError as error:
        raise ChargebeeUnavailable(f"ChargeBee unreachable: {type(error).__name__}") from error
    except Exception as error:
        # The SDK raises a bare Exception for replies that are not ChargeBee JSON (proxies, outages).
        if type(error) is Exception:
            raise ChargebeeUnavailable(f"ChargeBee sent an unexpected reply: {str(error)[:200]}") from error
        raise


async def ensure_customer(client: Chargebee, user_id: str, email: str | None) -> str:
    """The ChargeBee customer for a Clerk user (id = the Clerk user id), created on first purchase.

    A checkout's `customer[id]` only finds an existing customer, so it has to exist first. Two clicks can
    race to create it; the loser sees `duplicate_entry` and uses the winner's. InvalidId for an id that
    is not a ChargeBee one (nothing is sent).
    """
    ids.chargebee_id(user_id, "ChargeBee customer id")
    try:
        await _call(client.Customer.retrieve(user_id))
        return user_id
    except ChargebeeRejected as error:
        if error.api_error_code != "resource_not_found":
            raise
    params: dict[str, Any] = {"id": user_id}
    if email:
        params["email"] = email
    try:
        await _call(client.Customer.create(params))
    except ChargebeeRejected as error:
        if error.api_error_code != "duplicate_entry":
            raise
    return user_id


async def open_checkout(
    client: Chargebee, *, customer_id: str, plan: Plan, redirect_url: str, cancel_url: str
) -> str:
    """A hosted checkout page subscribing the customer to `plan`; returns the URL to send the buyer to."""
    if plan.item_price_id is None:
        raise ValueError(f"{plan.name} is not sold through ChargeBee")
    response = await _call(
        client.HostedPage.checkout_new_for_items(
            {
                "customer": {"id": customer_id},
                "subscription_items": [{"item_price_id": plan.item_price_id, "quantity": 1}],
                "redirect_url": redirect_url,
                "cancel_url": cancel_url,
            }
        )
    )
    return str(response.hosted_page.url)


async def open_portal(client: Chargebee, *, customer_id: str, redirect_url: str) -> str:
    """A self-service portal session for the customer; returns its one-time access URL."""
    response = await _call(
        client.PortalSession.create({"customer": {"id": customer_id}, "redirect_url": redirect_url})
    )
    return str(response.portal_session.access_url)


async def retrieve_checkout(client: Chargebee, hosted_page_id: str) -> CheckoutResult:
    """A hosted page read back; InvalidId (nothing is sent) for an id that cannot be a hosted page's."""
    response = await _call(client.HostedPage.retrieve(ids.hosted_page_id(hosted_page_id)))
    page = response.hosted_page
    content: dict[str, Any] = page.content or {}
    subscription = content.get("subscription")
    customer = content.get("customer") or {}
    return CheckoutResult(
        id=str(page.id),
        state=str(page.state),
        customer_id=customer.get("id") or (subscription or {}).get("customer_id"),
        subscription=msgspec.convert(subscription, SubscriptionSnapshot) if subscription else None,
    )


async def live_subscription(client: Chargebee, customer_id: str) -> SubscriptionSnapshot | None:
    """The customer's newest subscription that still bills (or may again), if any."""
    found = await _list_subscriptions(client, customer_id, sort="created_at", limit=1, statuses=LIVE_STATUSES)
    return found[0] if found else None


async def recent_subscriptions(client: Chargebee, customer_id: str, limit: int) -> list[SubscriptionSnapshot]:
    """The customer's `limit` most recently changed subscriptions, newest change first: one list call
    that catches a reactivated old subscription as well as a new one."""
    return await _list_subscriptions(client, customer_id, sort="updated_at", limit=limit)


async def _list_subscriptions(
    client: Chargebee,
    customer_id: str,
    *,
    sort: str,
    limit: int,
    statuses: tuple[str, ...] | None = None,
) -> list[SubscriptionSnapshot]:
    params: dict[str, Any] = {
        "customer_id": {"is": ids.chargebee_id(customer_id, "ChargeBee customer id")},
        "sort_by": {"desc": sort},
        "limit": limit,
    }
    if statuses:
        # Plain strings: the SDK sends a list filter as str(list), which spells an enum member as its repr.
        params["status"] = {"in": [str(status) for status in statuses]}
    response = await _call(client.Subscription.list(params))
    return [msgspec.convert(entry.subscription.raw_data, SubscriptionSnapshot) for entry in response.list]
