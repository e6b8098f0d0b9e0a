"""The GPU worker's requests to the app: usage reports and stream claims, both signed.

`POST /api/usage/report` is machine-to-machine. It is authenticated by the worker's HMAC signature over
the body (STREAM_SECRET, `inference.signing.verify_signed`) and by nothing else: it is not behind the
user guard, a session cookie gives no right to it, and it is exempt from CSRF (app/security.py) because
no browser ever calls it. Answers the worker's reporter understands:

* 200: the report is durable in Clerk (or was already counted);
* 401: unsigned, forged or stale signature; 409: a stream the ledger refuses (never retry these);
* 503: Clerk failed; retry later, which cannot double count.

`POST /api/stream/claim` is the worker's too, signed the same way: before it sends `ready` on a
connection, the worker claims the ticket's stream, and the ledger grants each stream once (200), refusing
every later claim with 409 on whichever worker it arrives, so a ticket streams once however many workers
there are.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_401_UNAUTHORIZED,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from app.settings import Settings
from billing.accounts import AccountStoreError, ClerkUnavailable, UnknownUser
from billing.ledger import LedgerRefused
from billing.ledger_store import LedgerStore
from billing.metadata import MetadataError
from inference.protocol import StreamClaim, UsageReport
from inference.signing import MAX_SIGNED_BODY_BYTES, Purpose, SignedRequestError, verify_signed

log = logging.getLogger(__name__)

# What a 503 tells the worker's reporter to wait before it tries again.
RETRY_AFTER_SECONDS = "2"
_T = TypeVar("_T")


def _error(status_code: int, error: str, message: str, **headers: str) -> Response[dict[str, str]]:
    return Response({"error": error, "message": message}, status_code=status_code, headers=headers)


async def _signed(
    request: Request[Any, Any, Any], settings: Settings, purpose: Purpose, kind: type[_T]
) -> _T | Response[Any]:
    """The worker's signed message, or the 401 for a request no worker signed (never retried)."""
    try:
        return verify_signed(settings.stream_secret, purpose, request.headers, await request.body(), kind)
    except SignedRequestError as exc:
        client = request.client.host if request.client else "?"
        log.warning("%s refused from %s: %s", purpose.label, client, exc)
        return _error(
            HTTP_401_UNAUTHORIZED, "unauthenticated", f"The {purpose.label} is not signed by a worker."
        )


async def _stored(what: str, stream_id: str, user_id: str, change: Awaitable[_T]) -> _T | Response[Any]:
    """What a worker's request changed in the account, or the answer that tells the worker why not:
    409 (the ledger refuses: never retry), 404 (no such user), 503 or 500 (retry later, harmlessly)."""
    try:
        return await change
    except LedgerRefused as refused:
        log.warning("%s for stream %s of %s refused: %s", what, stream_id, user_id, refused)
        return _error(HTTP_409_CONFLICT, refused.reason.value, str(refused))
    except UnknownUser:
        log.error("%s for stream %s names unknown user %s", what, stream_id, user_id)
        return _error(HTTP_404_NOT_FOUND, "unknown_user", "No account has this user id.")
    except ClerkUnavailable:
        return _error(
            HTTP_503_SERVICE_UNAVAILABLE,
            "accounts_unavailable",
            f"The account store is unavailable; retry the {what}.",
            **{"Retry-After": RETRY_AFTER_SECONDS},
        )
    except (AccountStoreError, MetadataError):
        # Not transient as far as we can tell, but a retry is harmless and nothing may be lost.
        log.exception("%s for stream %s of %s could not be stored", what, stream_id, user_id)
        return _error(HTTP_500_INTERNAL_SERVER_ERROR, "not_stored", f"The {what} could not be stored.")


class WorkerRequestsController(Controller):
    # A report is a few hundred bytes; anything larger than a signed request can be is refused with 413
    # before it is read, so unsigned floods cost no memory.
    @post(
        "/api/usage/report",
        name="usage_report",
        status_code=HTTP_200_OK,
        request_max_body_size=MAX_SIGNED_BODY_BYTES,
    )
    async def report(
        self,
        request: Request[Any, Any, Any],
        settings: NamedDependency[Settings],
        ledger: NamedDependency[LedgerStore],
    ) -> Response[dict[str, Any]]:
        report = await _signed(request, settings, Purpose.USAGE, UsageReport)
        if isinstance(report, Response):
            return report
        applied = await _stored("usage report", report.stream_id, report.user_id, ledger.record(report))
        if isinstance(applied, Response):
            return applied
        return Response(
            {
                "stream_id": applied.stream_id,
                "added_seconds": applied.added_seconds,
                "stream_seconds": applied.stream_seconds,
                # False: a running stream's report, taken and written to Clerk within seconds.
                "durable": applied.durable,
            },
            status_code=HTTP_200_OK,
        )

    @post(
        "/api/stream/claim",
        name="stream_claim",
        status_code=HTTP_200_OK,
        request_max_body_size=MAX_SIGNED_BODY_BYTES,
    )
    async def claim(
        self,
        request: Request[Any, Any, Any],
        settings: NamedDependency[Settings],
        ledger: NamedDependency[LedgerStore],
    ) -> Response[dict[str, str]]:
        claim = await _signed(request, settings, Purpose.CLAIM, StreamClaim)
        if isinstance(claim, Response):
            return claim
        granted = await _stored("stream claim", claim.stream_id, claim.user_id, ledger.claim(claim))
        if isinstance(granted, Response):
            return granted
        log.info("stream %s of %s claimed by worker %s", claim.stream_id, claim.user_id, claim.worker_id)
        return Response({"status": "claimed", "stream_id": claim.stream_id}, status_code=HTTP_200_OK)
