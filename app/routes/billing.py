"""Plans, checkout and the customer portal: the pages and endpoints, and the plugin that wires billing in.

`BillingPlugin` is the one registration `create_app` needs: it adds these routes, the ChargeBee webhook,
the sandbox ChargeBee emulator (sandbox mode only), and a lifespan that puts the shared billing services
on `app.state`:

* `app.state.catalogue`: `billing.plans.PlanCatalogue`
* `app.state.accounts`: `billing.accounts.AccountStore` (cached Clerk metadata)
* `app.state.chargebee`: the ChargeBee SDK client (async)

Money decisions are all made here on the server: the browser names a plan, and the server decides what
it costs (the item price) and what it grants (the catalogue), and learns what was bought only from
ChargeBee itself (webhooks, or reading the hosted page back after checkout).

Coming back from the portal refreshes the account from ChargeBee (one list call, one Clerk write), so it
is honoured only for the signed return link this app put in the portal session (`?returned=portal&t=…`,
which no other site can make for a user), and at most once per `PORTAL_REFRESH_INTERVAL_S` per user. The
time of the last refresh lives in the user's private metadata, which every app process reads, so the
limit holds however many processes serve the user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import msgspec
from chargebee import Chargebee
from litestar import Controller, Litestar, Request, Response, get, post
from litestar.config.app import AppConfig
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromQuery
from litestar.plugins import InitPlugin
from litestar.response import Template
from litestar.status_codes import HTTP_200_OK, HTTP_303_SEE_OTHER, HTTP_400_BAD_REQUEST

from app.auth import SessionEnded, SignedInUser, requires_user
from app.settings import Settings
from billing.accounts import Account, AccountStore, AccountStoreError, UnknownUser
from billing.chargebee_client import (
    ChargebeeRejected,
    ChargebeeUnavailable,
    create_chargebee_client,
    ensure_customer,
    live_subscription,
    open_checkout,
    open_portal,
    recent_subscriptions,
    retrieve_checkout,
)
from billing.entitlement import Entitlement, entitlement, format_clock
from billing.ids import is_hosted_page_id
from billing.metadata import BillingMetadata, MetadataError, SubscriptionStatus
from billing.plans import Plan, PlanCatalogue
from billing.webhooks import (
    DEFAULT_MEMORY,
    SubscriptionSnapshot,
    apply_subscription,
    apply_subscriptions,
    subscription_refusal,
)

log = logging.getLogger(__name__)

# Messages for `?error=` on the pricing page: codes in URLs, words on the page.
ERRORS = {
    "unknown-plan": "That plan does not exist. Pick one of the plans below.",
    "billing-unavailable": "Billing is unavailable right now. Nothing was charged; please try again shortly.",
    "billing-refused": "Billing could not start a checkout for your account. Please contact support.",
    "account-unavailable": "Your account could not be loaded right now. Please try again shortly.",
}
BAD_CHECKOUT_LINK = "That checkout link is not one ChargeBee gave out, so nothing was looked up."
PORTAL_CHANGES_PENDING = "Changes you just made in the billing portal can take a few seconds to show here."
# A return from the portal refreshes the account from ChargeBee at most this often per user.
PORTAL_REFRESH_INTERVAL_S = 30
# How long a portal return link stays good; ChargeBee's portal sessions are shorter.
PORTAL_RETURN_TTL_S = 6 * 3600
STATUS_LABELS = {
    SubscriptionStatus.ACTIVE: ("Active", "ok"),
    SubscriptionStatus.IN_TRIAL: ("Trial", "ok"),
    SubscriptionStatus.NON_RENEWING: ("Cancels at period end", "warn"),
    SubscriptionStatus.PAUSED: ("Paused", "warn"),
    SubscriptionStatus.FUTURE: ("Starts soon", "warn"),
    SubscriptionStatus.CANCELLED: ("Cancelled", "bad"),
    SubscriptionStatus.TRANSFERRED: ("Transferred", "bad"),
}


class BillingServices:
    """What billing handlers share, built once per app in the plugin's lifespan."""

    def __init__(
        self, settings: Settings, catalogue: PlanCatalogue, accounts: AccountStore, chargebee: Chargebee
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.accounts = accounts
        self.chargebee = chargebee


def provide_billing(state: State) -> BillingServices:
    services = state.get("billing")
    if not isinstance(services, BillingServices):
        raise RuntimeError("billing services are not running: register BillingPlugin in create_app()")
    return services


# ---- view models ------------------------------------------------------------------------------------------


class PlanCard(msgspec.Struct, frozen=True, kw_only=True):
    plan: Plan
    current: bool
    # "checkout": a form posting the plan; "sign-in": a link; "none": nothing to buy (Free).
    action: str
    label: str
    allowance: str


class AccountView(msgspec.Struct, frozen=True, kw_only=True):
    plan_name: str
    status_label: str
    status_tone: str
    time_left: str
    allowance: str
    allowance_note: str
    used_percent: int
    low: bool
    renewal: str | None
    payment_due: bool
    can_manage: bool
    on_free_allowance: bool


def _date(timestamp: int | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%-d %b %Y")


def _duration(seconds: int) -> str:
    if seconds % 60 == 0:
        minutes = seconds // 60
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _allowance_text(plan: Plan) -> str:
    if plan.lifetime:
        return f"{_duration(plan.seconds)} of live restyling, once"
    return f"{_duration(plan.seconds)} of live restyling every month"


def plan_cards(catalogue: PlanCatalogue, account: Account | None, signed_in: bool) -> list[PlanCard]:
    current = entitlement(account.metadata.public, catalogue) if account else None
    cards = []
    for plan in catalogue.plans:
        is_current = current is not None and current.plan.id == plan.id
        if not plan.paid:
            action, label = ("none", "Included") if signed_in else ("sign-in", "Start free")
        elif not signed_in:
            action, label = "sign-in", f"Sign in to choose {plan.name}"
        elif is_current:
            action, label = "checkout", "Manage plan"
        elif current is not None and current.plan.paid:
            action, label = "checkout", f"Switch to {plan.name}"
        else:
            action, label = "checkout", f"Choose {plan.name}"
        cards.append(
            PlanCard(
                plan=plan, current=is_current, action=action, label=label, allowance=_allowance_text(plan)
            )
        )
    return cards


def account_view(account: Account, catalogue: PlanCatalogue) -> AccountView:
    public = account.metadata.public
    view: Entitlement = entitlement(public, catalogue)
    if public.status is None:
        status_label, tone = ("Free plan", "ok")
    else:
        status_label, tone = STATUS_LABELS[public.status]
    if public.payment_due and public.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.NON_RENEWING):
        status_label, tone = "Payment due", "bad"
    renewal = None
    if public.period_end is not None:
        if public.status is SubscriptionStatus.NON_RENEWING:
            renewal = f"Ends on {_date(public.period_end)}"
        elif public.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.IN_TRIAL):
            renewal = f"Renews on {_date(public.period_end)}"
    used_percent = (
        100 if view.allowance_seconds == 0 else round(100 * view.used_seconds / view.allowance_seconds)
    )
    return AccountView(
        plan_name=view.subscribed_plan.name,
        status_label=status_label,
        status_tone=tone,
        time_left=format_clock(view.remaining_seconds),
        allowance=format_clock(view.allowance_seconds),
        allowance_note="once, for your account" if view.plan.lifetime else "this billing period",
        used_percent=min(100, used_percent),
        low=view.remaining_seconds <= max(60, view.allowance_seconds // 10),
        renewal=renewal,
        payment_due=public.payment_due,
        can_manage=account.metadata.private.customer_id is not None,
        on_free_allowance=not view.plan.paid,
    )


# ---- handlers ---------------------------------------------------------------------------------------------


class PlanForm(msgspec.Struct):
    plan: str = ""


def _go(request: Request[Any, Any, Any], url: str) -> Response[bytes]:
    """Send the browser to `url`: HX-Redirect for htmx (a full navigation, which ChargeBee's pages need),
    a 303 for a plain form post."""
    if request.headers.get("hx-request") == "true":
        return Response(b"", status_code=HTTP_200_OK, headers={"HX-Redirect": url})
    return Response(b"", status_code=HTTP_303_SEE_OTHER, headers={"Location": url})


def _fail(request: Request[Any, Any, Any], code: str, status_code: int) -> Response[bytes]:
    """A refused billing action: back to the pricing page with the reason shown there. htmx follows
    HX-Redirect whatever the status, so the status can stay honest."""
    target = "/pricing?" + urlencode({"error": code})
    if request.headers.get("hx-request") == "true":
        return Response(b"", status_code=status_code, headers={"HX-Redirect": target})
    return Response(b"", status_code=HTTP_303_SEE_OTHER, headers={"Location": target})


def _return_key(secret: str) -> bytes:
    # Its own key, derived from the CSRF secret, so a return link can never pass for a CSRF token.
    return hmac.new(secret.encode(), b"stylecast portal return link", hashlib.sha256).digest()


def portal_return_token(secret: str, user_id: str, issued_at: int) -> str:
    """The `t` of a portal return link: when it was made and a MAC over the user and that time."""
    mac = hmac.new(_return_key(secret), f"{user_id}\x00{issued_at}".encode(), hashlib.sha256).digest()
    return f"{issued_at}.{base64.urlsafe_b64encode(mac[:20]).decode().rstrip('=')}"


def portal_return_valid(secret: str, user_id: str, token: str | None, now: int) -> bool:
    """`token` was made by this app for this user, and not too long ago (nor in the future)."""
    issued_text, _, _ = (token or "").partition(".")
    if not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued_at = int(issued_text)
    if not now - PORTAL_RETURN_TTL_S <= issued_at <= now + 60:
        return False
    return hmac.compare_digest(portal_return_token(secret, user_id, issued_at), token or "")


async def _portal_url(billing: BillingServices, user_id: str) -> str:
    """A self-serve portal session that returns to the account page, which then re-reads the plan."""
    token = portal_return_token(billing.settings.csrf_secret, user_id, int(time.time()))
    return await open_portal(
        billing.chargebee,
        customer_id=user_id,
        redirect_url=f"{billing.settings.app_url}/account?{urlencode({'returned': 'portal', 't': token})}",
    )


async def _send_to(
    request: Request[Any, Any, Any],
    action: str,
    user: SignedInUser,
    destination: Callable[[], Awaitable[str]],
) -> Response[bytes]:
    """Send the browser to the ChargeBee page `destination` opens, or back to pricing with the reason."""
    try:
        url = await destination()
    except ChargebeeUnavailable:
        log.warning("%s for %s: ChargeBee unavailable", action, user.user_id, exc_info=True)
        return _fail(request, "billing-unavailable", 503)
    except ChargebeeRejected:
        log.exception("%s for %s refused by ChargeBee", action, user.user_id)
        return _fail(request, "billing-refused", 502)
    except (AccountStoreError, MetadataError):
        log.warning("%s for %s: account unavailable", action, user.user_id, exc_info=True)
        return _fail(request, "account-unavailable", 503)
    return _go(request, url)


async def _account_or_none(billing: BillingServices, user: SignedInUser | None) -> Account | None:
    if user is None:
        return None
    try:
        return await billing.accounts.get(user.user_id)
    except (AccountStoreError, MetadataError):
        log.warning("could not load billing metadata for %s", user.user_id, exc_info=True)
        return None


class BillingController(Controller):
    dependencies = {"billing": Provide(provide_billing, sync_to_thread=False)}

    @get("/pricing", name="pricing")
    async def pricing(
        self,
        billing: NamedDependency[BillingServices],
        maybe_user: NamedDependency[SignedInUser | None],
        error: FromQuery[str | None] = None,
    ) -> Template:
        account = await _account_or_none(billing, maybe_user)
        return Template(
            "pricing.html",
            context={
                "user": maybe_user,
                "cards": plan_cards(billing.catalogue, account, maybe_user is not None),
                "error": ERRORS.get(error or ""),
            },
        )

    @get("/partials/plan-cards", name="plan_cards")
    async def plan_cards_partial(
        self, billing: NamedDependency[BillingServices], maybe_user: NamedDependency[SignedInUser | None]
    ) -> Template:
        account = await _account_or_none(billing, maybe_user)
        return Template(
            "partials/plan_cards.html",
            context={"cards": plan_cards(billing.catalogue, account, maybe_user is not None)},
        )

    @get("/account", name="account", guards=[requires_user])
    async def account(
        self,
        request: Request[Any, Any, Any],
        billing: NamedDependency[BillingServices],
        user: NamedDependency[SignedInUser],
    ) -> Template:
        # ChargeBee appends ?id=<hosted page>&state=succeeded to a checkout's redirect_url ("state" is a
        # reserved handler argument in Litestar, hence the raw query).
        query = request.query_params
        page_id, returned = query.get("id"), query.get("returned")
        notice = problem = None
        status_code = HTTP_200_OK
        try:
            if page_id and query.get("state") == "succeeded":
                if is_hosted_page_id(page_id):
                    notice = await self._confirm_checkout(billing, user, page_id)
                else:
                    # It would go into ChargeBee's URL path; "../customers/x" would fetch a customer.
                    log.warning("account page for %s: %r is not a hosted page id", user.user_id, page_id[:60])
                    problem, status_code = BAD_CHECKOUT_LINK, HTTP_400_BAD_REQUEST
            elif returned == "portal":
                notice = await self._refresh_after_portal(billing, user, query.get("t"))
            account = await billing.accounts.get(user.user_id)
        except UnknownUser:
            raise SessionEnded from None  # deleted in Clerk: sign the browser out
        except (AccountStoreError, MetadataError):
            log.exception("account page could not load billing metadata for %s", user.user_id)
            return Template(
                "account.html",
                context={"view": None, "error": ERRORS["account-unavailable"], "notice": None, "cards": []},
                status_code=503,
            )
        view = account_view(account, billing.catalogue)
        return Template(
            "account.html",
            context={
                "view": view,
                "email": account.email,
                "notice": notice,
                "problem": problem,
                "error": None,
                "cards": plan_cards(billing.catalogue, account, True) if view.on_free_allowance else [],
            },
            status_code=status_code,
        )

    async def _confirm_checkout(
        self, billing: BillingServices, user: SignedInUser, page_id: str
    ) -> str | None:
        """Read the finished checkout back from ChargeBee and apply it now, so the buyer sees their plan
        without waiting for the webhook (which then changes nothing: same subscription version)."""
        try:
            result = await retrieve_checkout(billing.chargebee, page_id)
        except ChargebeeUnavailable:
            log.warning(
                "could not read back checkout %s; the webhook will bring the plan", page_id, exc_info=True
            )
            return "Payment received. Your plan will appear here in a moment."
        except ChargebeeRejected:
            log.warning("checkout %s in the address bar is not a ChargeBee hosted page", page_id)
            return None
        # The page id comes from the address bar: only the buyer's own finished checkout counts.
        subscription = result.subscription
        if result.state != "succeeded" or result.customer_id != user.user_id or subscription is None:
            return None
        if (reason := _unusable(subscription, user)) is not None:
            log.error("checkout %s for %s not applied: %s", page_id, user.user_id, reason)
            return None
        await self._apply(billing, user, subscription)
        return "Payment received. Thank you!"

    async def _refresh_after_portal(
        self, billing: BillingServices, user: SignedInUser, token: str | None
    ) -> str | None:
        """Back from the portal: take the customer's recently changed subscriptions as ChargeBee has them
        now (webhooks may still be on their way), the same way webhooks apply them. Only for this app's
        return link, and at most once per PORTAL_REFRESH_INTERVAL_S per user; otherwise the webhooks
        bring the change and the page says so."""
        now = int(time.time())
        if not portal_return_valid(billing.settings.csrf_secret, user.user_id, token, now):
            log.info("portal return for %s without a valid return link: not refreshed", user.user_id)
            return None
        last = (await billing.accounts.get(user.user_id)).metadata.private.refreshed_at
        if last is not None and abs(now - last) < PORTAL_REFRESH_INTERVAL_S:
            return PORTAL_CHANGES_PENDING
        try:
            found = await recent_subscriptions(
                billing.chargebee, user.user_id, DEFAULT_MEMORY.max_subscriptions
            )
        except (ChargebeeUnavailable, ChargebeeRejected):
            log.warning("could not refresh %s from ChargeBee after the portal", user.user_id, exc_info=True)
            return PORTAL_CHANGES_PENDING
        usable = []
        for subscription in found:
            if (reason := _unusable(subscription, user)) is not None:
                log.error("subscription %s of %s not applied: %s", subscription.id, user.user_id, reason)
            else:
                usable.append(subscription)

        def change(account: Account) -> BillingMetadata | None:
            metadata = apply_subscriptions(account.metadata, usable, billing.catalogue).metadata
            metadata = metadata or account.metadata
            stamped = max(now, metadata.private.refreshed_at or 0)
            return msgspec.structs.replace(
                metadata, private=msgspec.structs.replace(metadata.private, refreshed_at=stamped)
            )

        await billing.accounts.update(user.user_id, change)
        return None

    @staticmethod
    async def _apply(
        billing: BillingServices, user: SignedInUser, subscription: SubscriptionSnapshot
    ) -> None:
        def change(account: Account) -> BillingMetadata | None:
            return apply_subscription(account.metadata, subscription, billing.catalogue).metadata

        await billing.accounts.update(user.user_id, change)

    @post("/api/billing/checkout", name="billing_checkout", guards=[requires_user], status_code=303)
    async def checkout(
        self,
        request: Request[Any, Any, Any],
        billing: NamedDependency[BillingServices],
        user: NamedDependency[SignedInUser],
        data: Annotated[PlanForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[bytes]:
        plan = billing.catalogue.parse(data.plan)
        if plan is None or not plan.paid:
            return _fail(request, "unknown-plan", 400)
        base = billing.settings.app_url

        async def destination() -> str:
            account = await billing.accounts.get(user.user_id)
            customer_id = await ensure_customer(billing.chargebee, user.user_id, account.email)
            if account.metadata.private.customer_id is None:
                # Remember the customer before any webhook does, so the account page can offer the portal.
                await billing.accounts.update(user.user_id, _with_customer(customer_id))
            # One subscription per customer: someone who already has one changes it in the portal.
            if await live_subscription(billing.chargebee, customer_id) is not None:
                return await _portal_url(billing, user.user_id)
            return await open_checkout(
                billing.chargebee,
                customer_id=customer_id,
                plan=plan,
                redirect_url=f"{base}/account",
                cancel_url=f"{base}/pricing",
            )

        return await _send_to(request, "checkout", user, destination)

    @post("/api/billing/portal", name="billing_portal", guards=[requires_user], status_code=303)
    async def portal(
        self,
        request: Request[Any, Any, Any],
        billing: NamedDependency[BillingServices],
        user: NamedDependency[SignedInUser],
    ) -> Response[bytes]:
        async def destination() -> str:
            account = await billing.accounts.get(user.user_id)
            await ensure_customer(billing.chargebee, user.user_id, account.email)
            return await _portal_url(billing, user.user_id)

        return await _send_to(request, "portal", user, destination)


def _unusable(subscription: SubscriptionSnapshot, user: SignedInUser) -> str | None:
    """Why a subscription read from ChargeBee for `user` must not be applied to their account, or None."""
    if subscription.customer_id != user.user_id:
        return f"it belongs to customer {subscription.customer_id[:60]!r}"
    return subscription_refusal(subscription, int(time.time() * 1000))


def _with_customer(customer_id: str) -> Callable[[Account], BillingMetadata | None]:
    def change(account: Account) -> BillingMetadata | None:
        if account.metadata.private.customer_id == customer_id:
            return None
        private = msgspec.structs.replace(account.metadata.private, customer_id=customer_id)
        return msgspec.structs.replace(account.metadata, private=private)

    return change


# ---- wiring -----------------------------------------------------------------------------------------------


class BillingPlugin(InitPlugin):
    """Registers billing: `plugins=[..., BillingPlugin(settings)]` in create_app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalogue = PlanCatalogue.from_settings(settings)
        self.emulator: Any = None

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        from app.routes.webhooks import ChargebeeWebhookController

        app_config.route_handlers.extend([BillingController, ChargebeeWebhookController])
        if self.settings.is_sandbox:
            self.emulator = build_sandbox_emulator(self.settings, self.catalogue)
            app_config.route_handlers.append(self.emulator.router)
            app_config.state["chargebee_emulator"] = self.emulator
        # After the services lifespan, which opens the Clerk client this one builds on.
        app_config.lifespan.append(self.lifespan)
        return app_config

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        services = BillingServices(
            settings=self.settings,
            catalogue=self.catalogue,
            accounts=AccountStore(app.state.clerk),
            chargebee=create_chargebee_client(self.settings),
        )
        app.state.billing = services
        app.state.catalogue = services.catalogue
        app.state.accounts = services.accounts
        app.state.chargebee = services.chargebee
        if self.emulator is not None:
            self.emulator.start()
        try:
            yield
        finally:
            if self.emulator is not None:
                await self.emulator.aclose()


def build_sandbox_emulator(settings: Settings, catalogue: PlanCatalogue) -> Any:
    from app.sandbox.chargebee_emulator import ChargebeeEmulator, SandboxItemPrice, price_in_minor_units

    return ChargebeeEmulator(
        settings.state_dir / "chargebee.json",
        api_key=settings.chargebee_api_key,
        public_url=settings.app_url,
        webhook_url=f"{settings.internal_url}/api/webhooks/chargebee",
        webhook_username=settings.chargebee_webhook_username,
        webhook_password=settings.chargebee_webhook_password,
        item_prices=[
            SandboxItemPrice(
                id=plan.item_price_id or "",
                name=f"Stylecast {plan.name}",
                price_display=plan.price_display,
                unit_price=price_in_minor_units(plan.price_display),
            )
            for plan in catalogue.paid
        ],
    )
