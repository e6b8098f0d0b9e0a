"""Plans: the pricing page and its plan cards, the account page, and the buttons that go to ChargeBee's
checkout and portal. What they do with ChargeBee is app/subscriptions.py's; what they show, app/views.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Annotated, Any
from urllib.parse import urlencode

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromQuery
from litestar.response import Template
from litestar.status_codes import HTTP_200_OK, HTTP_303_SEE_OTHER, HTTP_400_BAD_REQUEST

from app.auth import SessionEnded, SignedInUser, requires_user
from app.subscriptions import Subscriptions
from app.views import account_view, plan_cards
from billing.accounts import Account, AccountStoreError, UnknownUser
from billing.chargebee_client import ChargebeeRejected, ChargebeeUnavailable
from billing.ids import is_hosted_page_id
from billing.metadata import MetadataError

log = logging.getLogger(__name__)

# Messages for `?error=` on the pricing page: codes in URLs, words on the page.
ERRORS = {
    "unknown-plan": "That plan does not exist. Pick one of the plans below.",
    "billing-unavailable": "Billing is unavailable right now. Nothing was charged; please try again shortly.",
    "billing-refused": "Billing could not start a checkout for your account. Please contact support.",
    "account-unavailable": "Your account could not be loaded right now. Please try again shortly.",
}
BAD_CHECKOUT_LINK = "That checkout link is not one ChargeBee gave out, so nothing was looked up."


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


async def _send_to(
    request: Request[Any, Any, Any], action: str, user: SignedInUser, destination: Awaitable[str]
) -> Response[bytes]:
    """Send the browser to the ChargeBee page `destination` opens, or back to pricing with the reason."""
    try:
        url = await destination
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


async def _account_or_none(subscriptions: Subscriptions, user: SignedInUser | None) -> Account | None:
    if user is None:
        return None
    try:
        return await subscriptions.accounts.get(user.user_id)
    except (AccountStoreError, MetadataError):
        log.warning("could not load billing metadata for %s", user.user_id, exc_info=True)
        return None


class PlansController(Controller):
    @get("/pricing", name="pricing")
    async def pricing(
        self,
        subscriptions: NamedDependency[Subscriptions],
        maybe_user: NamedDependency[SignedInUser | None],
        error: FromQuery[str | None] = None,
    ) -> Template:
        account = await _account_or_none(subscriptions, maybe_user)
        return Template(
            "pricing.html",
            context={
                "user": maybe_user,
                "cards": plan_cards(subscriptions.catalogue, account, maybe_user is not None),
                "error": ERRORS.get(error or ""),
            },
        )

    @get("/partials/plan-cards", name="plan_cards")
    async def plan_cards_partial(
        self,
        subscriptions: NamedDependency[Subscriptions],
        maybe_user: NamedDependency[SignedInUser | None],
    ) -> Template:
        account = await _account_or_none(subscriptions, maybe_user)
        return Template(
            "partials/plan_cards.html",
            context={"cards": plan_cards(subscriptions.catalogue, account, maybe_user is not None)},
        )

    @get("/account", name="account", guards=[requires_user])
    async def account(
        self,
        request: Request[Any, Any, Any],
        subscriptions: NamedDependency[Subscriptions],
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
                    notice = await subscriptions.confirm_checkout(user.user_id, page_id)
                else:
                    # It would go into ChargeBee's URL path; "../customers/x" would fetch a customer.
                    log.warning("account page for %s: %r is not a hosted page id", user.user_id, page_id[:60])
                    problem, status_code = BAD_CHECKOUT_LINK, HTTP_400_BAD_REQUEST
            elif returned == "portal":
                notice = await subscriptions.refresh_after_portal(user.user_id, query.get("t"))
            account = await subscriptions.accounts.get(user.user_id)
        except UnknownUser:
            raise SessionEnded from None  # deleted in Clerk: sign the browser out
        except (AccountStoreError, MetadataError):
            log.exception("account page could not load billing metadata for %s", user.user_id)
            return Template(
                "account.html",
                context={"view": None, "error": ERRORS["account-unavailable"], "notice": None, "cards": []},
                status_code=503,
            )
        view = account_view(account, subscriptions.catalogue)
        cards = plan_cards(subscriptions.catalogue, account, True) if view.on_free_allowance else []
        return Template(
            "account.html",
            context={
                "view": view,
                "email": account.email,
                "notice": notice,
                "problem": problem,
                "error": None,
                "cards": cards,
            },
            status_code=status_code,
        )

    @post("/api/billing/checkout", name="billing_checkout", guards=[requires_user], status_code=303)
    async def checkout(
        self,
        request: Request[Any, Any, Any],
        subscriptions: NamedDependency[Subscriptions],
        user: NamedDependency[SignedInUser],
        data: Annotated[PlanForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[bytes]:
        plan = subscriptions.catalogue.parse(data.plan)
        if plan is None or not plan.paid:
            return _fail(request, "unknown-plan", 400)
        return await _send_to(request, "checkout", user, subscriptions.checkout_url(user.user_id, plan))

    @post("/api/billing/portal", name="billing_portal", guards=[requires_user], status_code=303)
    async def portal(
        self,
        request: Request[Any, Any, Any],
        subscriptions: NamedDependency[Subscriptions],
        user: NamedDependency[SignedInUser],
    ) -> Response[bytes]:
        return await _send_to(request, "portal", user, subscriptions.portal_url(user.user_id))
