"""`POST /api/stream/ticket`: where the studio gets the worker's URL and a ticket to stream with.

The allowance is decided here, on the server, from the account's metadata: what the plan has left, minus
what the user's other live streams hold (billing/ledger.py). It is reserved in the ledger before the
ticket is handed out, so two tabs asking at once can never be granted more than the account has; the
reservation reaches Clerk with the stream's claim, the durable step before the first frame
(billing/ledger_store.py). Answers:

* 200 `{"url", "ticket", "stream_id", "allowance_seconds"}`;
* 402 `{"error": "out_of_minutes"}`: nothing left; the studio shows the plans;
* 409 `{"error": "minutes_in_use"}` with Retry-After: what is left is held by another live stream (another
  tab, or the stream this tab just closed, whose final report is on its way); asking again shortly works
  once that stream has ended;
* 503: Clerk is unavailable.
"""

from __future__ import annotations

import logging

from litestar import Controller, Response, post
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_402_PAYMENT_REQUIRED,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ASGIApp, Receive, Scope, Send

from app.auth import SessionEnded, SignedInUser, SignInRequired, requires_user
from app.settings import Settings
from billing.accounts import AccountStoreError, ClerkUnavailable, UnknownUser
from billing.ledger import LedgerRefused, Refusal
from billing.ledger_store import LedgerStore
from billing.metadata import MetadataError
from inference.tickets import issue_ticket

log = logging.getLogger(__name__)

# What a 409 or 503 suggests the studio wait before it asks again: another tab's stream, or the one this
# tab just closed, frees its minutes within a report or two.
RETRY_AFTER_SECONDS = "2"


class SessionBeforeCsrf(ASGIMiddleware):
    """Answers a request without a session with 401 before the CSRF check (which would say 403).

    Handler-level middleware runs after the app's SessionMiddleware and before Litestar's CSRF middleware.
    A request without a session carries no ambient authority, so there is nothing for CSRF to protect, and
    the studio needs the 401 to send a signed-out user to sign in. Signed-in requests still need the token.
    """

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope.get("user") is None:
            raise SignInRequired
        await next_app(scope, receive, send)


class StreamController(Controller):
    middleware = [SessionBeforeCsrf()]

    @post("/api/stream/ticket", name="stream_ticket", guards=[requires_user], status_code=HTTP_200_OK)
    async def ticket(
        self,
        user: NamedDependency[SignedInUser],
        settings: NamedDependency[Settings],
        ledger: NamedDependency[LedgerStore],
    ) -> Response[dict[str, object]]:
        try:
            reservation = await ledger.reserve(user.user_id)
        except LedgerRefused as refused:
            if refused.reason is Refusal.OUT_OF_MINUTES:
                return Response(
                    {"error": "out_of_minutes", "message": "You have no streaming time left."},
                    status_code=HTTP_402_PAYMENT_REQUIRED,
                )
            return Response(
                {"error": refused.reason.value, "message": str(refused)},
                status_code=HTTP_409_CONFLICT,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        except UnknownUser:
            raise SessionEnded from None  # deleted in Clerk: sign the browser out
        except ClerkUnavailable:
            return Response(
                {"error": "accounts_unavailable", "message": "Your account could not be loaded; try again."},
                status_code=HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        except (AccountStoreError, MetadataError):
            log.exception("stream ticket for %s: account could not be read or written", user.user_id)
            return Response(
                {"error": "account_error", "message": "Your account could not be loaded."},
                status_code=HTTP_500_INTERNAL_SERVER_ERROR,
            )
        token = issue_ticket(
            settings.stream_secret,
            user_id=user.user_id,
            stream_id=reservation.stream_id,
            allowance_seconds=reservation.allowance_seconds,
            ttl_seconds=ledger.policy.ticket_ttl_seconds,
        )
        return Response(
            {
                "url": settings.worker_url,
                "ticket": token,
                "stream_id": reservation.stream_id,
                "allowance_seconds": reservation.allowance_seconds,
            },
            status_code=HTTP_200_OK,
            headers={"Cache-Control": "no-store"},
        )
