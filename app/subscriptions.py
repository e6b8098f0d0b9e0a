"""What the pricing and account pages do with ChargeBee: open a checkout or a portal session, read a
finished checkout back, and refresh the account after the portal. The web app's one service over the
ChargeBee client, the account store and the catalogue; the controllers in app/routes/plans.py only turn
its answers into pages and redirects.

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
from collections.abc import Callable
from urllib.parse import urlencode

import msgspec
from chargebee import Chargebee

from billing.accounts import Account, AccountStore
from billing.chargebee_client import (
    ChargebeeRejected,
    ChargebeeUnavailable,
    ensure_customer,
    live_subscription,
    open_checkout,
    open_portal,
    recent_subscriptions,
    retrieve_checkout,
)
from billing.metadata import BillingMetadata
from billing.plans import Plan, PlanCatalogue
from billing.webhooks import (
    DEFAULT_MEMORY,
    SubscriptionSnapshot,
    apply_subscription,
    apply_subscriptions,
    subscription_refusal,
)

log = logging.getLogger(__name__)

PORTAL_CHANGES_PENDING = "Changes you just made in the billing portal can take a few seconds to show here."
# A return from the portal refreshes the account from ChargeBee at most this often per user.
PORTAL_REFRESH_INTERVAL_S = 30
# How long a portal return link stays good; ChargeBee's portal sessions are shorter.
PORTAL_RETURN_TTL_S = 6 * 3600


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


class Subscriptions:
    """Checkout, portal and read-backs for one app: built once, when the app starts (app/wiring.py)."""

    def __init__(
        self,
        *,
        chargebee: Chargebee,
        accounts: AccountStore,
        catalogue: PlanCatalogue,
        app_url: str,
        return_link_secret: str,
    ) -> None:
        self.chargebee = chargebee
        self.accounts = accounts
        self.catalogue = catalogue
        self._app_url = app_url
        self._return_link_secret = return_link_secret

    async def checkout_url(self, user_id: str, plan: Plan) -> str:
        """Where to send a buyer of `plan`: a hosted checkout, or the portal for a customer who already has
        a subscription (one per customer: they change it there)."""
        account = await self.accounts.get(user_id)
        customer_id = await ensure_customer(self.chargebee, user_id, account.email)
        if account.metadata.private.customer_id is None:
            # Remember the customer before any webhook does, so the account page can offer the portal.
            await self.accounts.update(user_id, _with_customer(customer_id))
        if await live_subscription(self.chargebee, customer_id) is not None:
            return await self._portal_url(user_id)
        return await open_checkout(
            self.chargebee,
            customer_id=customer_id,
            plan=plan,
            redirect_url=f"{self._app_url}/account",
            cancel_url=f"{self._app_url}/pricing",
        )

    async def portal_url(self, user_id: str) -> str:
        """A portal session for the user, whose ChargeBee customer is created first if need be."""
        account = await self.accounts.get(user_id)
        await ensure_customer(self.chargebee, user_id, account.email)
        return await self._portal_url(user_id)

    async def _portal_url(self, user_id: str) -> str:
        """A self-serve portal session that returns to the account page, which then re-reads the plan."""
        token = portal_return_token(self._return_link_secret, user_id, int(time.time()))
        return await open_portal(
            self.chargebee,
            customer_id=user_id,
            redirect_url=f"{self._app_url}/account?{urlencode({'returned': 'portal', 't': token})}",
        )

    async def confirm_checkout(self, user_id: str, page_id: str) -> str | None:
        """Read the finished checkout back from ChargeBee and apply it now, so the buyer sees their plan
        without waiting for the webhook (which then changes nothing: same subscription version). The
        notice for the page, or None."""
        try:
            result = await retrieve_checkout(self.chargebee, page_id)
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
        if result.state != "succeeded" or result.customer_id != user_id or subscription is None:
            return None
        if (reason := _unusable(subscription, user_id)) is not None:
            log.error("checkout %s for %s not applied: %s", page_id, user_id, reason)
            return None

        def change(account: Account) -> BillingMetadata | None:
            return apply_subscription(account.metadata, subscription, self.catalogue).metadata

        await self.accounts.update(user_id, change)
        return "Payment received. Thank you!"

    async def refresh_after_portal(self, user_id: str, token: str | None) -> str | None:
        """Back from the portal: take the customer's recently changed subscriptions as ChargeBee has them
        now (webhooks may still be on their way), the same way webhooks apply them. Only for this app's
        return link, and at most once per PORTAL_REFRESH_INTERVAL_S per user; otherwise the webhooks
        bring the change and the page says so. The notice for the page, or None."""
        now = int(time.time())
        if not portal_return_valid(self._return_link_secret, user_id, token, now):
            log.info("portal return for %s without a valid return link: not refreshed", user_id)
            return None
        last = (await self.accounts.get(user_id)).metadata.private.refreshed_at
        if last is not None and abs(now - last) < PORTAL_REFRESH_INTERVAL_S:
            return PORTAL_CHANGES_PENDING
        try:
            found = await recent_subscriptions(self.chargebee, user_id, DEFAULT_MEMORY.max_subscriptions)
        except (ChargebeeUnavailable, ChargebeeRejected):
            log.warning("could not refresh %s from ChargeBee after the portal", user_id, exc_info=True)
            return PORTAL_CHANGES_PENDING
        usable = []
        for subscription in found:
            if (reason := _unusable(subscription, user_id)) is not None:
                log.error("subscription %s of %s not applied: %s", subscription.id, user_id, reason)
            else:
                usable.append(subscription)

        def change(account: Account) -> BillingMetadata | None:
            metadata = apply_subscriptions(account.metadata, usable, self.catalogue).metadata
            metadata = metadata or account.metadata
            stamped = max(now, metadata.private.refreshed_at or 0)
            return msgspec.structs.replace(
                metadata, private=msgspec.structs.replace(metadata.private, refreshed_at=stamped)
            )

        await self.accounts.update(user_id, change)
        return None


def _unusable(subscription: SubscriptionSnapshot, user_id: str) -> str | None:
    """Why a subscription read from ChargeBee for `user_id` must not be applied to their account, or None."""
    if subscription.customer_id != user_id:
        return f"it belongs to customer {subscription.customer_id[:60]!r}"
    return subscription_refusal(subscription, int(time.time() * 1000))


def _with_customer(customer_id: str) -> Callable[[Account], BillingMetadata | None]:
    def change(account: Account) -> BillingMetadata | None:
        if account.metadata.private.customer_id == customer_id:
            return None
        private = msgspec.structs.replace(account.metadata.private, customer_id=customer_id)
        return msgspec.structs.replace(account.metadata, private=private)

    return change
