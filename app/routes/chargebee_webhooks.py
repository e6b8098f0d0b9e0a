"""`POST /api/webhooks/chargebee`: ChargeBee events folded into the Clerk metadata.

ChargeBee signs nothing; it authenticates webhooks with HTTP Basic credentials configured on the
webhook endpoint, so those are checked first, in constant time. The answer tells ChargeBee what to do:

* 2xx: done, never send it again. Used for applied events, duplicates, stale events, event types
  billing does not use, and customers that are not Stylecast users (retrying would never help).
* 401 / 400: wrong credentials / not an event.
* 422 `refused`: an event that reads as one but must not be applied (billing.webhooks.refusal): an id
  outside ChargeBee's alphabet (it would reach a URL path), a customer and a subscription that name
  different customers, an impossible resource_version. Logged as an error with the event id, never
  applied. ChargeBee retries a non-2xx event 7 times over about 3 days (each refused the same way), then
  marks it failed and emails the site's admins: that alert, and the event kept under Logs > Events with
  its payload (which this app does not log), is how someone gets to look at it. A 2xx would file it
  among the delivered ones.
* 5xx: Clerk could not be read or written. ChargeBee retries with backoff, and because applying an
  event is idempotent and order-safe (billing/webhooks.py) the retry is harmless. A lost update is never
  answered with 200.

Bodies are never logged: they carry customers' names and emails.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from app.settings import Settings
from billing.accounts import Account, AccountStore, AccountStoreError, ClerkUnavailable, UnknownUser
from billing.ids import is_clerk_user_id
from billing.metadata import BillingMetadata, MetadataError
from billing.plans import PlanCatalogue
from billing.webhooks import ChargebeeEvent, MalformedEvent, Outcome, apply_event, parse_event, refusal

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/api/webhooks/chargebee"
# ChargeBee's largest events (a subscription with its customer, card, invoice and line items) are tens of
# KB; 1 MiB keeps a wide margin while a flood of huge posts is refused (413) before it is read.
WEBHOOK_MAX_BODY_BYTES = 1024 * 1024


def _not_our_customer(event: ChargebeeEvent, user_id: str) -> Response[dict[str, str]]:
    """A customer this app did not create (ours are Clerk user ids): acknowledged, changing nothing."""
    log.warning(
        "ChargeBee event %s (%s) is for customer %s, which is not a Stylecast user; ignored",
        event.id,
        event.event_type,
        user_id,
    )
    return _answer(HTTP_200_OK, "ignored", "customer is not a user of this app")


def _answer(
    status_code: int, result: str, detail: str | None = None, headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"result": result}
    if detail:
        body["detail"] = detail
    return Response(body, status_code=status_code, headers=headers)


def credentials_match(authorization: str | None, username: str, password: str) -> bool:
    """HTTP Basic credentials compared in constant time (both parts always compared)."""
    scheme, _, encoded = (authorization or "").partition(" ")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    given_user, _, given_password = decoded.partition(b":")
    user_ok = hmac.compare_digest(given_user, username.encode())
    password_ok = hmac.compare_digest(given_password, password.encode())
    return scheme.lower() == "basic" and user_ok & password_ok


class ChargebeeWebhookController(Controller):
    @post(
        WEBHOOK_PATH,
        name="chargebee_webhook",
        status_code=200,
        include_in_schema=False,
        request_max_body_size=WEBHOOK_MAX_BODY_BYTES,
    )
    async def receive(
        self,
        request: Request[Any, Any, Any],
        settings: NamedDependency[Settings],
        catalogue: NamedDependency[PlanCatalogue],
        accounts: NamedDependency[AccountStore],
    ) -> Response[dict[str, Any]]:
        if not credentials_match(
            request.headers.get("authorization"),
            settings.chargebee_webhook_username,
            settings.chargebee_webhook_password,
        ):
            log.warning("ChargeBee webhook refused: bad or missing credentials from %s", _client(request))
            return _answer(
                HTTP_401_UNAUTHORIZED,
                "unauthorized",
                headers={"WWW-Authenticate": 'Basic realm="chargebee-webhooks"'},
            )
        try:
            event = parse_event(await request.body())
        except MalformedEvent as error:
            log.warning("ChargeBee webhook refused: %s", error)
            return _answer(HTTP_400_BAD_REQUEST, "malformed", "not a ChargeBee event")

        if not event.handled:
            log.debug("ChargeBee event %s (%s) ignored: not a billing event", event.id, event.event_type)
            return _answer(HTTP_200_OK, "ignored", f"{event.event_type} does not affect billing")
        refused = refusal(event, int(time.time() * 1000))
        if refused is not None:
            log.error("ChargeBee event %r (%s) refused: %s", event.id[:60], event.event_type, refused)
            return _answer(HTTP_422_UNPROCESSABLE_ENTITY, "refused", refused)
        user_id = event.customer_id
        if not user_id:
            log.warning("ChargeBee event %s (%s) names no customer; ignored", event.id, event.event_type)
            return _answer(HTTP_200_OK, "ignored", "no customer in the event")
        if event.content.subscription is None:
            return _answer(HTTP_200_OK, "ignored", f"{event.event_type} carries no subscription")
        if not is_clerk_user_id(user_id):
            # A ChargeBee customer, but not one this app created (ours are Clerk user ids).
            return _not_our_customer(event, user_id)

        outcome: Outcome | None = None

        def change(account: Account) -> BillingMetadata | None:
            nonlocal outcome
            outcome = apply_event(account.metadata, event, catalogue)
            return outcome.metadata

        try:
            await accounts.update(user_id, change)
        except UnknownUser:
            return _not_our_customer(event, user_id)
        except ClerkUnavailable as error:
            log.warning(
                "ChargeBee event %s (%s) not applied, Clerk unavailable: %s",
                event.id,
                event.event_type,
                error,
            )
            return _answer(
                HTTP_503_SERVICE_UNAVAILABLE, "retry", "account store unavailable", {"Retry-After": "30"}
            )
        except (AccountStoreError, MetadataError):
            log.exception("ChargeBee event %s (%s) not applied for %s", event.id, event.event_type, user_id)
            return _answer(HTTP_500_INTERNAL_SERVER_ERROR, "retry", "account could not be updated")

        assert outcome is not None
        log.info("ChargeBee event %s (%s) for %s: %s", event.id, event.event_type, user_id, outcome.reason)
        return _answer(HTTP_200_OK, "applied" if outcome.changed else "unchanged", outcome.reason)


def _client(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else "unknown"
