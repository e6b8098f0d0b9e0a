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
"""

from __future__ import annotations

import logging
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
from litestar.status_codes import HTTP_200_OK, HTTP_303_SEE_OTHER

from app.auth import SignedInUser, requires_user
from app.settings import Settings
from billing.accounts import Account, AccountStore, AccountStoreError
from billing.chargebee_client import (
    ChargebeeRejected,
    ChargebeeUnavailable,
    create_chargebee_client,
    ensure_customer,
    live_subscription,
    newest_subscription,
    open_checkout,
    open_portal,
    retrieve_checkout,
)
from billing.entitlement import Entitlement, entitlement, format_clock
from billing.metadata import BillingMetadata, MetadataError, SubscriptionStatus
from billing.plans import Plan, PlanCatalogue
from billing.webhooks import SubscriptionSnapshot, apply_subscription

log = logging.getLogger(__name__)

# Messages for `?error=` on the pricing page: codes in URLs, words on the page.
ERRORS = {
    "unknown-plan": "That plan does not exist. Pick one of the plans below.",
    "billing-unavailable": "Billing is unavailable right now. Nothing was charged; please try again shortly.",
    "billing-refused": "Billing could not start a checkout for your account. Please contact support.",
    "account-unavailable": "Your account could not be loaded right now. Please try again shortly.",
}
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


async def _portal_url(billing: BillingServices, customer_id: str) -> str:
    """A self-serve portal session that returns to the account page, which then re-reads the plan."""
    return await open_portal(
        billing.chargebee,
        customer_id=customer_id,
        redirect_url=f"{billing.settings.app_url}/account?returned=portal",
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
        notice = None
        try:
            if page_id and query.get("state") == "succeeded":
                notice = await self._confirm_checkout(billing, user, page_id)
            elif returned == "portal":
                await self._sync_newest_subscription(billing, user)
            account = await billing.accounts.get(user.user_id)
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
                "error": None,
                "cards": plan_cards(billing.catalogue, account, True) if view.on_free_allowance else [],
            },
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
        if result.state != "succeeded" or result.customer_id != user.user_id or result.subscription is None:
            return None
        await self._apply(billing, user, result.subscription)
        return "Payment received. Thank you!"

    async def _sync_newest_subscription(self, billing: BillingServices, user: SignedInUser) -> None:
        """Back from the portal: take the subscription as ChargeBee has it now (webhooks may still be on
        their way). Older states than what is stored are ignored by the same ordering as webhooks."""
        try:
            subscription = await newest_subscription(billing.chargebee, user.user_id)
        except (ChargebeeUnavailable, ChargebeeRejected):
            log.warning("could not sync %s from ChargeBee after the portal", user.user_id, exc_info=True)
            return
        if subscription is not None:
            await self._apply(billing, user, subscription)

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
                return await _portal_url(billing, customer_id)
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
            customer_id = await ensure_customer(billing.chargebee, user.user_id, account.email)
            return await _portal_url(billing, customer_id)

        return await _send_to(request, "portal", user, destination)


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
