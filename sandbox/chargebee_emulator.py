"""An emulator of the slice of ChargeBee that Stylecast uses, for sandbox mode (no ChargeBee keys).

The app reaches it only through the official `chargebee` SDK over HTTP, exactly as it reaches a real
site, so the API speaks ChargeBee's wire format: form-encoded requests with bracketed keys
(`subscription_items[item_price_id][0]`), JSON responses wrapped by resource name, HTTP Basic auth with
the API key as user name, and errors carrying `api_error_code`, `type`, `message`, `http_status_code`.

Besides the API (`{mount_path}/api/v2/...`; the web app mounts it at `/sandbox/chargebee`) it serves what
ChargeBee hosts for real sites: the checkout page a hosted page's `url` points at, and the self-service portal
a portal session's `access_url` opens. Every change is announced as a ChargeBee-shaped event POSTed to the
app's webhook URL with Basic auth, from a background task that retries failures with exponential backoff, the
way ChargeBee does; a request never waits on a delivery.

Not real ChargeBee, on purpose: `POST /subscriptions/{id}/advance_term` ends the current term now
(renewing, or cancelling a non-renewing subscription) so renewals can be tried without waiting a month.

Backdating, as a site with backdating enabled allows through the API: `cancel_for_items` with
`cancel_option=specific_date` and a past `cancel_at` (not before the current term), and `reactivate` with
a past `reactivate_from`, announce `subscription_canceled_with_backdating` and
`subscription_reactivated_with_backdating`. A future `cancel_at` (a scheduled cancellation on a date) is
not emulated and is refused.

Like ChargeBee's API log, the emulator keeps the most recent API requests it served (`api_log`), so
tests can see exactly which calls the app made with its key.

State (customers, subscriptions, pages, sessions and undelivered events) lives in one JSON file in the
state directory, replaced atomically after every change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import contextlib
import functools
import hmac
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath
from litestar.response import Redirect, Template

from billing.statuses import ENDED_STATUSES
from sandbox.files import write_private_file

log = logging.getLogger(__name__)

API_PATH = "/api/v2"
STORE_FORMAT = "stylecast-chargebee-emulator/1"
HOSTED_PAGE_TTL_S = 3 * 3600
PORTAL_SESSION_TTL_S = 3600
# ChargeBee tries a webhook once and retries it 7 times (over about 3 days) before it marks the event
# failed; the sandbox makes as many attempts, only sooner.
DELIVERY_MAX_ATTEMPTS = 8
DELIVERY_MAX_DELAY_S = 60.0
DELIVERY_TIMEOUT_S = 10.0

API_LOG_SIZE = 1000
# ChargeBee's subscription list sorts by these only.
_SORTABLE = ("created_at", "updated_at")
_json = msgspec.json.Encoder()


class SandboxItemPrice(msgspec.Struct, frozen=True, kw_only=True):
    """An item price as configured on a ChargeBee site (product catalog 2.0)."""

    id: str
    name: str
    price_display: str
    unit_price: int  # minor units (cents), as ChargeBee stores prices
    currency_code: str = "USD"


class Delivery(msgspec.Struct, kw_only=True):
    """An event waiting for the app's webhook endpoint to answer 2xx."""

    event: dict[str, Any]
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None


class CheckoutPage(msgspec.Struct, kw_only=True):
    id: str
    customer_id: str | None
    item_price_id: str
    redirect_url: str | None
    cancel_url: str | None
    state: str  # created | succeeded | cancelled
    created_at: int
    expires_at: int
    resource_version: int
    subscription_id: str | None = None


class PortalSession(msgspec.Struct, kw_only=True):
    id: str
    token: str
    customer_id: str
    redirect_url: str | None
    created_at: int
    expires_at: int


class _Store(msgspec.Struct, kw_only=True):
    format: str = STORE_FORMAT
    customers: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    hosted_pages: dict[str, CheckoutPage] = msgspec.field(default_factory=dict)
    portal_sessions: dict[str, PortalSession] = msgspec.field(default_factory=dict)
    outbox: list[Delivery] = msgspec.field(default_factory=list)


class ApiRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One API request as the emulator received it (after the client resolved any dot segments)."""

    method: str
    # Below the API root, e.g. "/subscriptions".
    path: str
    query: str


class ChargebeeAPIError(Exception):
    """An error in ChargeBee's shape; the SDK maps `type` to its exception classes."""

    def __init__(
        self, status_code: int, api_error_code: str, message: str, *, kind: str | None = "invalid_request"
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.api_error_code = api_error_code
        self.message = message
        self.kind = kind
        self.param: str | None = None

    def with_param(self, param: str) -> ChargebeeAPIError:
        self.param = param
        return self

    def to_response(self) -> Response[bytes]:
        body: dict[str, Any] = {
            "message": self.message,
            "api_error_code": self.api_error_code,
            "error_code": self.api_error_code,
            "error_msg": self.message,
            "http_status_code": self.status_code,
        }
        if self.kind:
            body["type"] = self.kind
        if self.param:
            body["param"] = self.param
            body["error_param"] = self.param
        return _api_response(body, self.status_code)


def _api_response(body: Any, status_code: int = 200) -> Response[bytes]:
    return Response(
        content=_json.encode(body), status_code=status_code, media_type="application/json;charset=utf-8"
    )


def _not_found(what: str, param: str) -> ChargebeeAPIError:
    return ChargebeeAPIError(404, "resource_not_found", f"Sorry, we couldn't find that {what}").with_param(
        param
    )


def _bad_value(param: str, message: str) -> ChargebeeAPIError:
    return ChargebeeAPIError(400, "param_wrong_value", message).with_param(param)


def _invalid_state(message: str) -> ChargebeeAPIError:
    return ChargebeeAPIError(400, "invalid_state_for_request", message)


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _api_errors(handler: _Handler) -> _Handler:
    """Answer ChargeBee errors as the API does, without letting them reach the app's error logging (a
    404 for a customer that does not exist yet is part of the normal checkout flow)."""

    @functools.wraps(handler)
    async def answering(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except ChargebeeAPIError as error:
            return error.to_response()

    return cast("_Handler", answering)


def _page_errors(handler: _Handler) -> _Handler:
    """The hosted pages answer errors in words, for the person looking at them."""

    @functools.wraps(handler)
    async def answering(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except ChargebeeAPIError as error:
            return Response(error.message, status_code=error.status_code, media_type="text/plain")

    return cast("_Handler", answering)


def _new_id(prefix: str) -> str:
    # ChargeBee ids are short base62-ish strings; a prefix makes sandbox ids easy to spot in logs.
    return f"{prefix}_sbx_{secrets.token_hex(8)}"


def add_months(timestamp: int, months: int = 1) -> int:
    """The same wall-clock moment `months` later (clamped to the month's last day), as ChargeBee bills."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def _bool_param(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _timestamp_param(value: str | None, param: str) -> int:
    try:
        return int(value or "")
    except ValueError as exc:
        raise _bad_value(param, f"{param} must be a unix timestamp in seconds") from exc


def _parse_list_filter(value: str | None) -> list[str]:
    """`status[in]` arrives as `["a","b"]` (JSON) or `['a', 'b']` (the Python SDK's str(list))."""
    if not value:
        return []
    return [part.strip().strip("'\"") for part in value.strip().strip("[]").split(",") if part.strip()]


def _with_query(url: str, extra: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *extra.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _http_url(value: str | None, param: str) -> str | None:
    if not value:
        return None
    if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise _bad_value(param, f"{param} must be an absolute http(s) URL")
    return value


class ChargebeeEmulator:
    """Mount `.router` in the app, where it serves everything under `mount_path`; call `start()` inside the
    running loop and `aclose()` on shutdown."""

    def __init__(
        self,
        store_path: Path,
        *,
        mount_path: str,
        api_key: str,
        public_url: str,
        webhook_url: str,
        webhook_username: str,
        webhook_password: str,
        item_prices: Sequence[SandboxItemPrice],
        retry_base_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store_path = store_path
        self._api_key = api_key.encode()
        self._mount_path = mount_path.rstrip("/")
        # Where browsers reach the hosted pages (the app's public origin plus our mount path).
        self._pages_url = public_url.rstrip("/") + self._mount_path
        self._webhook_url = webhook_url
        self._webhook_auth = (webhook_username, webhook_password)
        self.item_prices = {price.id: price for price in item_prices}
        self._retry_base_s = retry_base_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._store = self._load()
        self.api_log: deque[ApiRequest] = deque(maxlen=API_LOG_SIZE)
        self.router = self._build_router()

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering events (including any a previous run left undelivered)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._deliver_forever(), name="chargebee-webhooks"
            )
            self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def pending_events(self) -> list[dict[str, Any]]:
        return [delivery.event for delivery in self._store.outbox]

    # ---- persistence -----------------------------------------------------------------------------------

    def _load(self) -> _Store:
        if not self._store_path.exists():
            return _Store()
        store = msgspec.json.decode(self._store_path.read_bytes(), type=_Store)
        if store.format != STORE_FORMAT:
            raise ValueError(f"{self._store_path} is not a ChargeBee emulator store ({STORE_FORMAT})")
        return store

    def _write_store(self, payload: bytes) -> None:
        write_private_file(self._store_path, payload)

    async def _commit(self) -> None:
        """Persist the in-memory state. Callers hold `self._lock`, so writes land in change order; if the
        write fails, memory is rolled back to what is on disk so nothing is served that a restart loses."""
        try:
            await asyncio.to_thread(self._write_store, _json.encode(self._store))
        except BaseException:
            self._store = self._load()
            raise

    # ---- resources -------------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _touch(self, resource: dict[str, Any]) -> None:
        # resource_version is ChargeBee's per-resource change counter in milliseconds; strictly increasing.
        now = self._clock()
        resource["resource_version"] = max(int(now * 1000), int(resource.get("resource_version", 0)) + 1)
        resource["updated_at"] = int(now)

    def _customer_or_404(self, customer_id: str) -> dict[str, Any]:
        customer = self._store.customers.get(customer_id)
        if customer is None:
            raise _not_found("customer", "customer_id")
        return customer

    def _subscription_or_404(self, subscription_id: str) -> dict[str, Any]:
        subscription = self._store.subscriptions.get(subscription_id)
        if subscription is None:
            raise _not_found("subscription", "subscription_id")
        return subscription

    def _item_price_or_404(self, item_price_id: str | None, param: str) -> SandboxItemPrice:
        price = self.item_prices.get(item_price_id or "")
        if price is None:
            raise _not_found("item price", param)
        return price

    def _new_customer(self, customer_id: str, email: str | None, first_name: str | None) -> dict[str, Any]:
        now = self._now()
        customer: dict[str, Any] = {
            "id": customer_id,
            "auto_collection": "on",
            "net_term_days": 0,
            "allow_direct_debit": False,
            "created_at": now,
            "taxability": "taxable",
            "pii_cleared": "active",
            "channel": "web",
            "deleted": False,
            "object": "customer",
            "card_status": "no_card",
            "promotional_credits": 0,
            "refundable_credits": 0,
            "excess_payments": 0,
            "unbilled_charges": 0,
            "preferred_currency_code": "USD",
        }
        if email:
            customer["email"] = email
        if first_name:
            customer["first_name"] = first_name
        self._touch(customer)
        return customer

    def _new_subscription(self, customer_id: str, price: SandboxItemPrice) -> dict[str, Any]:
        now = self._now()
        end = add_months(now)
        subscription: dict[str, Any] = {
            "id": _new_id("sub"),
            "customer_id": customer_id,
            "status": "active",
            "currency_code": price.currency_code,
            "billing_period": 1,
            "billing_period_unit": "month",
            "auto_collection": "on",
            "created_at": now,
            "started_at": now,
            "activated_at": now,
            "current_term_start": now,
            "current_term_end": end,
            "next_billing_at": end,
            "due_invoices_count": 0,
            "has_scheduled_changes": False,
            "channel": "web",
            "deleted": False,
            "object": "subscription",
        }
        self._set_item_price(subscription, price)
        self._touch(subscription)
        return subscription

    @staticmethod
    def _set_item_price(subscription: dict[str, Any], price: SandboxItemPrice) -> None:
        subscription["currency_code"] = price.currency_code
        subscription["mrr"] = price.unit_price
        subscription["subscription_items"] = [
            {
                "item_price_id": price.id,
                "item_type": "plan",
                "quantity": 1,
                "unit_price": price.unit_price,
                "amount": price.unit_price,
                "free_quantity": 0,
                "object": "subscription_item",
            }
        ]

    def _start_new_term(self, subscription: dict[str, Any], start: int) -> None:
        subscription["current_term_start"] = start
        subscription["current_term_end"] = add_months(start)
        subscription["next_billing_at"] = subscription["current_term_end"]

    @staticmethod
    def _cancel(subscription: dict[str, Any], at: int) -> None:
        # A cancelled subscription has no current term; the sandbox writes off what was still due.
        subscription.update(status="cancelled", cancelled_at=at, due_invoices_count=0)
        for field in ("current_term_start", "current_term_end", "next_billing_at", "due_since"):
            subscription.pop(field, None)

    def _page_json(self, page: CheckoutPage) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": page.id,
            "type": "checkout_new",
            "url": f"{self._pages_url}/checkout/{page.id}",
            "state": page.state,
            "embed": False,
            "created_at": page.created_at,
            "expires_at": page.expires_at,
            "resource_version": page.resource_version,
            "updated_at": page.created_at,
            "object": "hosted_page",
        }
        if page.state == "succeeded" and page.subscription_id:
            subscription = self._store.subscriptions[page.subscription_id]
            body["content"] = {
                "subscription": subscription,
                "customer": self._store.customers[subscription["customer_id"]],
            }
        return body

    def _portal_json(self, session: PortalSession) -> dict[str, Any]:
        return {
            "id": session.id,
            "token": session.token,
            "access_url": f"{self._pages_url}/portal/{session.token}",
            "redirect_url": session.redirect_url,
            "status": "created",
            "created_at": session.created_at,
            "expires_at": session.expires_at,
            "customer_id": session.customer_id,
            "object": "portal_session",
        }

    def _portal_view(self, subscription: dict[str, Any]) -> dict[str, Any]:
        """What the sandbox portal shows for a subscription, and the actions its status allows."""
        status = subscription["status"]
        [item] = subscription["subscription_items"]
        price = self.item_prices.get(item["item_price_id"])
        actions = {
            "active": [
                "cancel_end_of_term",
                "cancel_now",
                "change_plan",
                "advance_term",
                "advance_term_payment_fails",
            ],
            "non_renewing": ["remove_scheduled_cancellation", "cancel_now", "change_plan", "advance_term"],
            "cancelled": ["reactivate"],
        }.get(status, [])
        if subscription.get("due_invoices_count"):
            actions.append("pay_due")

        def day(timestamp: int | None) -> str:
            return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%-d %b %Y") if timestamp else ""

        return {
            "id": subscription["id"],
            "name": price.name if price else item["item_price_id"],
            "price": price.price_display if price else "",
            "item_price_id": item["item_price_id"],
            "status": status,
            "term_start": day(subscription.get("current_term_start")),
            "term_end": day(subscription.get("current_term_end")),
            "cancelled_at": day(subscription.get("cancelled_at")),
            "due": int(subscription.get("due_invoices_count") or 0),
            "actions": actions,
            "other_prices": [
                other for other in self.item_prices.values() if other.id != item["item_price_id"]
            ],
        }

    def _with_customer(self, subscription: dict[str, Any]) -> dict[str, Any]:
        return {"subscription": subscription, "customer": self._store.customers[subscription["customer_id"]]}

    # ---- events ----------------------------------------------------------------------------------------

    def _emit(self, subscription: dict[str, Any], *event_types: str, source: str) -> None:
        """Queue the events one change triggers; they share the subscription snapshot, as ChargeBee's do."""
        customer = self._store.customers[subscription["customer_id"]]
        now = self._now()
        for event_type in event_types:
            content: dict[str, Any] = {"subscription": dict(subscription), "customer": dict(customer)}
            if event_type in (
                "payment_succeeded",
                "payment_failed",
                "invoice_generated",
                "invoice_generated_with_backdating",
            ):
                content.update(self._invoice_and_transaction(subscription, event_type))
            event = {
                "id": _new_id("ev"),
                "occurred_at": now,
                "source": source,
                "object": "event",
                "api_version": "v2",
                "event_type": event_type,
                "webhook_status": "scheduled",
                "content": content,
            }
            self._store.outbox.append(Delivery(event=event, next_attempt_at=self._clock()))
        self._wake.set()

    @staticmethod
    def _invoice_and_transaction(subscription: dict[str, Any], event_type: str) -> dict[str, Any]:
        amount = int(subscription.get("mrr", 0))
        paid = event_type != "payment_failed"
        invoice = {
            "id": _new_id("inv"),
            "customer_id": subscription["customer_id"],
            "subscription_id": subscription["id"],
            "status": "paid" if paid else "payment_due",
            "date": subscription.get("current_term_start") or subscription.get("updated_at"),
            "total": amount,
            "amount_paid": amount if paid else 0,
            "amount_due": 0 if paid else amount,
            "currency_code": subscription.get("currency_code", "USD"),
            "object": "invoice",
        }
        if event_type.startswith("invoice_generated"):
            return {"invoice": invoice}
        transaction = {
            "id": _new_id("txn"),
            "customer_id": subscription["customer_id"],
            "subscription_id": subscription["id"],
            "type": "payment",
            "status": "success" if paid else "failure",
            "amount": amount,
            "currency_code": subscription.get("currency_code", "USD"),
            "object": "transaction",
        }
        return {"invoice": invoice, "transaction": transaction}

    async def _deliver_forever(self) -> None:
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_S, auth=self._webhook_auth) as client:
            while True:
                # Cleared before looking, so an event queued while we deliver wakes the next wait.
                self._wake.clear()
                now = self._clock()
                for delivery in [item for item in self._store.outbox if item.next_attempt_at <= now]:
                    try:
                        await self._deliver(client, delivery)
                    except Exception:
                        # A failed state write must not end deliveries for the life of the app.
                        log.exception("delivering %s failed unexpectedly", delivery.event.get("id"))
                        delivery.next_attempt_at = self._clock() + DELIVERY_MAX_DELAY_S
                timeout = None
                if self._store.outbox:
                    timeout = max(
                        0.0, min(item.next_attempt_at for item in self._store.outbox) - self._clock()
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        event = delivery.event
        try:
            response = await client.post(
                self._webhook_url, content=_json.encode(event), headers=_JSON_HEADERS
            )
            failure = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            failure = f"{type(error).__name__}: {error}"
        async with self._lock:
            if failure is None:
                self._store.outbox = [item for item in self._store.outbox if item is not delivery]
                log.debug("delivered %s %s", event["event_type"], event["id"])
            else:
                delivery.attempts += 1
                delivery.last_error = failure
                if delivery.attempts >= DELIVERY_MAX_ATTEMPTS:
                    self._store.outbox = [item for item in self._store.outbox if item is not delivery]
                    log.error(
                        "gave up delivering %s %s after %d attempts: %s",
                        event["event_type"],
                        event["id"],
                        delivery.attempts,
                        failure,
                    )
                else:
                    delay = min(self._retry_base_s * 2 ** (delivery.attempts - 1), DELIVERY_MAX_DELAY_S)
                    delivery.next_attempt_at = self._clock() + delay
                    log.warning(
                        "webhook %s %s failed (%s); retry %d in %.1fs",
                        event["event_type"],
                        event["id"],
                        failure,
                        delivery.attempts,
                        delay,
                    )
            await self._commit()

    # ---- operations (the API and the hosted pages share these) -------------------------------------------

    async def create_customer(self, params: dict[str, str]) -> dict[str, Any]:
        async with self._lock:
            customer_id = params.get("id") or _new_id("cus")
            if customer_id in self._store.customers:
                raise ChargebeeAPIError(
                    400, "duplicate_entry", f"The value {customer_id} is already present."
                ).with_param("id")
            customer = self._new_customer(customer_id, params.get("email"), params.get("first_name"))
            self._store.customers[customer_id] = customer
            await self._commit()
            return customer

    async def checkout_new_for_items(self, params: dict[str, str]) -> CheckoutPage:
        item_price_id = params.get("subscription_items[item_price_id][0]")
        self._item_price_or_404(item_price_id, "subscription_items[item_price_id][0]")
        customer_id = params.get("customer[id]") or None
        if customer_id is not None:
            # Like ChargeBee: customer[id] selects an existing customer, it does not create one.
            self._customer_or_404(customer_id)
        now = self._now()
        page = CheckoutPage(
            id=_new_id("hp"),
            customer_id=customer_id,
            item_price_id=str(item_price_id),
            redirect_url=_http_url(params.get("redirect_url"), "redirect_url"),
            cancel_url=_http_url(params.get("cancel_url"), "cancel_url"),
            state="created",
            created_at=now,
            expires_at=now + HOSTED_PAGE_TTL_S,
            resource_version=int(self._clock() * 1000),
        )
        async with self._lock:
            self._store.hosted_pages[page.id] = page
            await self._commit()
        return page

    def checkout_page(self, page_id: str) -> CheckoutPage:
        page = self._store.hosted_pages.get(page_id)
        if page is None:
            raise _not_found("hosted page", "id")
        return page

    async def pay(self, page_id: str) -> CheckoutPage:
        """The buyer pays: the subscription starts, and the hosted page remembers it (paying twice is a
        no-op, as reloading ChargeBee's success page is)."""
        async with self._lock:
            page = self.checkout_page(page_id)
            if page.state == "succeeded":
                return page
            if page.state != "created" or page.expires_at < self._now():
                raise _invalid_state("This checkout page has expired. Start the checkout again.")
            price = self._item_price_or_404(page.item_price_id, "item_price_id")
            customer_id = page.customer_id
            if customer_id is None:
                customer_id = _new_id("cus")
                self._store.customers[customer_id] = self._new_customer(customer_id, None, None)
            subscription = self._new_subscription(customer_id, price)
            self._store.subscriptions[subscription["id"]] = subscription
            page.state, page.subscription_id = "succeeded", subscription["id"]
            page.resource_version = int(self._clock() * 1000)
            self._emit(
                subscription,
                "subscription_created",
                "invoice_generated",
                "payment_succeeded",
                source="hosted_page",
            )
            await self._commit()
            return page

    async def create_portal_session(self, params: dict[str, str]) -> PortalSession:
        customer_id = params.get("customer[id]") or ""
        self._customer_or_404(customer_id)
        now = self._now()
        session = PortalSession(
            id=_new_id("portal"),
            token=secrets.token_urlsafe(24),
            customer_id=customer_id,
            redirect_url=_http_url(params.get("redirect_url"), "redirect_url"),
            created_at=now,
            expires_at=now + PORTAL_SESSION_TTL_S,
        )
        async with self._lock:
            # Expired sessions are useless; dropping them keeps the store small.
            self._store.portal_sessions = {
                token: kept for token, kept in self._store.portal_sessions.items() if kept.expires_at > now
            }
            self._store.portal_sessions[session.token] = session
            await self._commit()
        return session

    def portal_session(self, token: str) -> PortalSession:
        session = self._store.portal_sessions.get(token)
        if session is None or session.expires_at < self._now():
            raise NotFoundException("This portal link has expired. Open the portal again from your account.")
        return session

    def customer_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        found = [sub for sub in self._store.subscriptions.values() if sub["customer_id"] == customer_id]
        return sorted(found, key=lambda sub: (sub["created_at"], sub["id"]), reverse=True)

    async def change(
        self, subscription_id: str, action: str, *, item_price_id: str | None = None, at: int | None = None
    ) -> dict[str, Any]:
        """Apply one lifecycle action, then emit the events ChargeBee would for it. `at` is the past moment
        a backdated action takes effect."""
        async with self._lock:
            subscription = self._subscription_or_404(subscription_id)
            event_types, source = self._apply_action(subscription, action, item_price_id, at)
            self._touch(subscription)
            self._emit(subscription, *event_types, source=source)
            await self._commit()
            return subscription

    def _apply_action(
        self, subscription: dict[str, Any], action: str, item_price_id: str | None, at: int | None = None
    ) -> tuple[tuple[str, ...], str]:
        status = subscription["status"]
        now = self._now()
        if action == "cancel_backdated":
            if status in ENDED_STATUSES:
                raise _invalid_state("The subscription is already cancelled.")
            assert at is not None
            if at > now:
                raise _bad_value("cancel_at", "The sandbox only emulates cancel_at in the past (backdating).")
            if at < int(subscription.get("current_term_start") or subscription["created_at"]):
                raise _bad_value("cancel_at", "cancel_at cannot be before the start of the current term.")
            self._cancel(subscription, at)
            return ("subscription_canceled_with_backdating",), "api"
        if action == "reactivate_backdated":
            if status != "cancelled":
                raise _invalid_state("Only a cancelled subscription can be reactivated.")
            assert at is not None
            if at > now:
                raise _bad_value("reactivate_from", "reactivate_from must not be in the future.")
            if at < int(subscription.get("cancelled_at") or subscription["created_at"]):
                raise _bad_value("reactivate_from", "reactivate_from cannot be before the cancellation.")
            subscription.update(status="active", activated_at=at)
            subscription.pop("cancelled_at", None)
            self._start_new_term(subscription, at)
            return (
                "subscription_reactivated_with_backdating",
                "invoice_generated_with_backdating",
                "payment_succeeded",
            ), "api"
        if action == "cancel_end_of_term":
            if status != "active":
                raise _invalid_state(f"Only an active subscription can be cancelled at term end ({status}).")
            subscription["status"] = "non_renewing"
            subscription["cancelled_at"] = subscription["current_term_end"]
            subscription.pop("next_billing_at", None)
            return ("subscription_cancellation_scheduled",), "portal"
        if action == "cancel_now":
            if status in ENDED_STATUSES:
                raise _invalid_state("The subscription is already cancelled.")
            self._cancel(subscription, now)
            return ("subscription_cancelled",), "portal"
        if action == "remove_scheduled_cancellation":
            if status != "non_renewing":
                raise _invalid_state("The subscription has no scheduled cancellation.")
            subscription["status"] = "active"
            subscription.pop("cancelled_at", None)
            subscription["next_billing_at"] = subscription["current_term_end"]
            return ("subscription_scheduled_cancellation_removed",), "portal"
        if action == "reactivate":
            if status != "cancelled":
                raise _invalid_state("Only a cancelled subscription can be reactivated.")
            subscription.update(status="active", activated_at=now)
            subscription.pop("cancelled_at", None)
            self._start_new_term(subscription, now)
            return ("subscription_reactivated", "invoice_generated", "payment_succeeded"), "portal"
        if action == "change_plan":
            if status not in ("active", "non_renewing", "in_trial"):
                raise _invalid_state(f"A {status} subscription cannot change plans.")
            price = self._item_price_or_404(item_price_id, "subscription_items[item_price_id][0]")
            self._set_item_price(subscription, price)
            return ("subscription_changed",), "portal"
        if action in ("advance_term", "advance_term_payment_fails"):
            if status == "non_renewing":
                self._cancel(subscription, subscription["current_term_end"])
                return ("subscription_cancelled",), "scheduled_job"
            if status != "active":
                raise _invalid_state(f"A {status} subscription has no term to renew.")
            self._start_new_term(subscription, subscription["current_term_end"])
            if action == "advance_term_payment_fails":
                subscription["due_invoices_count"] = int(subscription.get("due_invoices_count", 0)) + 1
                subscription.setdefault("due_since", subscription["current_term_start"])
                return ("subscription_renewed", "invoice_generated", "payment_failed"), "scheduled_job"
            return ("subscription_renewed", "invoice_generated", "payment_succeeded"), "scheduled_job"
        if action == "pay_due":
            if not subscription.get("due_invoices_count"):
                raise _invalid_state("The subscription has nothing due.")
            subscription["due_invoices_count"] = 0
            subscription.pop("due_since", None)
            return ("payment_succeeded",), "portal"
        raise _bad_value("action", f"Unknown action {action!r}")

    # ---- HTTP ------------------------------------------------------------------------------------------

    def _build_router(self) -> Router:
        emulator = self

        api_root = self._mount_path + API_PATH

        async def authenticate(request: Request[Any, Any, Any]) -> Response[bytes] | None:
            emulator.api_log.append(
                ApiRequest(
                    method=request.method,
                    path=request.url.path.removeprefix(api_root),
                    query=request.url.query or "",
                )
            )
            scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
            try:
                user, _, _password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user = ""
            if scheme.lower() != "basic" or not hmac.compare_digest(user.encode(), emulator._api_key):
                return ChargebeeAPIError(
                    401,
                    "api_authentication_failed",
                    "Sorry, authentication failed. Invalid api key",
                    kind=None,
                ).to_response()
            return None

        async def form(request: Request[Any, Any, Any]) -> dict[str, str]:
            return dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))

        @post("/customers", status_code=200)
        @_api_errors
        async def create_customer(request: Request[Any, Any, Any]) -> Response[bytes]:
            customer = await emulator.create_customer(await form(request))
            return _api_response({"customer": customer})

        @get("/customers/{customer_id:str}")
        @_api_errors
        async def retrieve_customer(customer_id: FromPath[str]) -> Response[bytes]:
            return _api_response({"customer": emulator._customer_or_404(customer_id)})

        @post("/hosted_pages/checkout_new_for_items", status_code=200)
        @_api_errors
        async def checkout_new_for_items(request: Request[Any, Any, Any]) -> Response[bytes]:
            page = await emulator.checkout_new_for_items(await form(request))
            return _api_response({"hosted_page": emulator._page_json(page)})

        @get("/hosted_pages/{page_id:str}")
        @_api_errors
        async def retrieve_hosted_page(page_id: FromPath[str]) -> Response[bytes]:
            return _api_response({"hosted_page": emulator._page_json(emulator.checkout_page(page_id))})

        @post("/portal_sessions", status_code=200)
        @_api_errors
        async def create_portal_session(request: Request[Any, Any, Any]) -> Response[bytes]:
            session = await emulator.create_portal_session(await form(request))
            return _api_response({"portal_session": emulator._portal_json(session)})

        @get("/subscriptions/{subscription_id:str}")
        @_api_errors
        async def retrieve_subscription(subscription_id: FromPath[str]) -> Response[bytes]:
            return _api_response(emulator._with_customer(emulator._subscription_or_404(subscription_id)))

        @get("/subscriptions")
        @_api_errors
        async def list_subscriptions(request: Request[Any, Any, Any]) -> Response[bytes]:
            query = request.query_params
            found = list(emulator._store.subscriptions.values())
            if customer := query.get("customer_id[is]"):
                found = [sub for sub in found if sub["customer_id"] == customer]
            if statuses := _parse_list_filter(query.get("status[in]")):
                found = [sub for sub in found if sub["status"] in statuses]
            if status := query.get("status[is]"):
                found = [sub for sub in found if sub["status"] == status]
            ascending, descending = query.get("sort_by[asc]"), query.get("sort_by[desc]")
            field = ascending or descending or "created_at"
            if field not in _SORTABLE or (ascending and descending):
                raise _bad_value("sort_by", f"sort_by supports one of {', '.join(_SORTABLE)}")
            found.sort(key=lambda sub: (sub[field], sub["id"]), reverse=not ascending)
            try:
                limit = max(1, min(100, int(query.get("limit") or 10)))
                offset = max(0, int(query.get("offset") or 0))
            except ValueError as exc:
                raise _bad_value("limit", "limit and offset must be whole numbers") from exc
            page = found[offset : offset + limit]
            body: dict[str, Any] = {"list": [emulator._with_customer(sub) for sub in page]}
            if offset + limit < len(found):
                body["next_offset"] = str(offset + limit)
            return _api_response(body)

        async def subscription_action(
            subscription_id: str, action: str, item: str | None = None
        ) -> Response[bytes]:
            subscription = await emulator.change(subscription_id, action, item_price_id=item)
            return _api_response(emulator._with_customer(subscription))

        @post("/subscriptions/{subscription_id:str}/cancel_for_items", status_code=200)
        @_api_errors
        async def cancel_for_items(
            subscription_id: FromPath[str], request: Request[Any, Any, Any]
        ) -> Response[bytes]:
            params = await form(request)
            if params.get("cancel_option") == "specific_date" or params.get("cancel_at"):
                at = _timestamp_param(params.get("cancel_at"), "cancel_at")
                subscription = await emulator.change(subscription_id, "cancel_backdated", at=at)
                return _api_response(emulator._with_customer(subscription))
            at_term_end = (
                _bool_param(params.get("end_of_term")) or params.get("cancel_option") == "end_of_term"
            )
            return await subscription_action(
                subscription_id, "cancel_end_of_term" if at_term_end else "cancel_now"
            )

        @post("/subscriptions/{subscription_id:str}/remove_scheduled_cancellation", status_code=200)
        @_api_errors
        async def remove_scheduled_cancellation(subscription_id: FromPath[str]) -> Response[bytes]:
            return await subscription_action(subscription_id, "remove_scheduled_cancellation")

        @post("/subscriptions/{subscription_id:str}/reactivate", status_code=200)
        @_api_errors
        async def reactivate(
            subscription_id: FromPath[str], request: Request[Any, Any, Any]
        ) -> Response[bytes]:
            params = await form(request)
            if params.get("reactivate_from"):
                at = _timestamp_param(params.get("reactivate_from"), "reactivate_from")
                subscription = await emulator.change(subscription_id, "reactivate_backdated", at=at)
                return _api_response(emulator._with_customer(subscription))
            return await subscription_action(subscription_id, "reactivate")

        @post("/subscriptions/{subscription_id:str}/update_for_items", status_code=200)
        @_api_errors
        async def update_for_items(
            subscription_id: FromPath[str], request: Request[Any, Any, Any]
        ) -> Response[bytes]:
            item = (await form(request)).get("subscription_items[item_price_id][0]")
            return await subscription_action(subscription_id, "change_plan", item)

        @post("/subscriptions/{subscription_id:str}/advance_term", status_code=200)
        @_api_errors
        async def advance_term(
            subscription_id: FromPath[str], request: Request[Any, Any, Any]
        ) -> Response[bytes]:
            fails = _bool_param((await form(request)).get("fail_payment"))
            return await subscription_action(
                subscription_id, "advance_term_payment_fails" if fails else "advance_term"
            )

        def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
            code = "resource_not_found" if exc.status_code == 404 else "invalid_request"
            return ChargebeeAPIError(exc.status_code, code, str(exc.detail)).to_response()

        api = Router(
            path=API_PATH,
            route_handlers=[
                create_customer,
                retrieve_customer,
                checkout_new_for_items,
                retrieve_hosted_page,
                create_portal_session,
                retrieve_subscription,
                list_subscriptions,
                cancel_for_items,
                remove_scheduled_cancellation,
                reactivate,
                update_for_items,
                advance_term,
            ],
            before_request=authenticate,
            exception_handlers={HTTPException: http_error},
        )

        # ---- pages a real site hosts on chargebee.com: the buyer's browser comes here ----

        @get("/checkout/{page_id:str}")
        @_page_errors
        async def checkout_page(page_id: FromPath[str]) -> Template:
            page = emulator.checkout_page(page_id)
            return Template(
                "sandbox/checkout.html",
                context={
                    "page": page,
                    "price": emulator.item_prices.get(page.item_price_id),
                    "customer": emulator._store.customers.get(page.customer_id or ""),
                    "expired": page.state == "created" and page.expires_at < emulator._now(),
                },
            )

        @post("/checkout/{page_id:str}/pay", status_code=303)
        @_page_errors
        async def pay(page_id: FromPath[str]) -> Redirect:
            page = await emulator.pay(page_id)
            target = page.redirect_url or f"{emulator._pages_url}/checkout/{page.id}"
            # ChargeBee appends the hosted page id and state so the site can confirm the purchase.
            return Redirect(_with_query(target, {"id": page.id, "state": page.state}), status_code=303)

        @get("/portal/{token:str}")
        @_page_errors
        async def portal(token: FromPath[str], request: Request[Any, Any, Any]) -> Template:
            session = emulator.portal_session(token)
            return Template(
                "sandbox/portal.html",
                context={
                    "session": session,
                    "customer": emulator._store.customers.get(session.customer_id),
                    "subscriptions": [
                        emulator._portal_view(sub)
                        for sub in emulator.customer_subscriptions(session.customer_id)
                    ],
                    "item_prices": list(emulator.item_prices.values()),
                    "notice": request.query_params.get("notice"),
                },
            )

        @post("/portal/{token:str}/action", status_code=303)
        @_page_errors
        async def portal_action(token: FromPath[str], request: Request[Any, Any, Any]) -> Redirect:
            session = emulator.portal_session(token)
            submitted = await request.form()
            subscription_id = str(submitted.get("subscription_id") or "")
            subscription = emulator._store.subscriptions.get(subscription_id)
            if subscription is None or subscription["customer_id"] != session.customer_id:
                raise NotFoundException("No such subscription for this customer.")
            action = str(submitted.get("action") or "")
            try:
                await emulator.change(
                    subscription_id, action, item_price_id=str(submitted.get("item_price_id") or "") or None
                )
                notice = _PORTAL_NOTICES.get(action, "Done.")
            except ChargebeeAPIError as error:
                notice = error.message
            return Redirect(
                _with_query(f"{emulator._pages_url}/portal/{token}", {"notice": notice}), status_code=303
            )

        pages = Router(
            path="/",
            route_handlers=[checkout_page, pay, portal, portal_action],
        )
        return Router(path=self._mount_path or "/", route_handlers=[api, pages], include_in_schema=False)


_PORTAL_NOTICES = {
    "cancel_end_of_term": "Your subscription will end at the end of the current term.",
    "cancel_now": "Your subscription is cancelled.",
    "remove_scheduled_cancellation": "Your subscription will renew as usual.",
    "reactivate": "Your subscription is active again.",
    "change_plan": "Your plan is changed.",
    "advance_term": "The term has ended (sandbox time travel).",
    "advance_term_payment_fails": "The term has ended and its payment failed (sandbox time travel).",
    "pay_due": "Thank you, the unpaid invoice is settled.",
}
_JSON_HEADERS = {"content-type": "application/json", "user-agent": "ChargeBee-Sandbox-Webhooks"}
_PRICE_NUMBER = re.compile(r"(\d+(?:[.,]\d{1,2})?)")


def price_in_minor_units(display: str) -> int:
    """ "$12 / month" -> 1200: the sandbox shows the configured display price and charges that amount."""
    match = _PRICE_NUMBER.search(display)
    if match is None:
        return 0
    return round(float(match.group(1).replace(",", ".")) * 100)
