"""Stream tickets: short-lived HS256 JWTs that the app issues (after checking the user's plan) and the worker
verifies before rendering a single frame.

The issuer and audience claims are specific to this purpose, so neither a Clerk session token nor any
other JWT signed with the same secret can be replayed as a ticket, and a ticket cannot be used elsewhere.
"""

from __future__ import annotations

import secrets
import time
from typing import Final

import jwt
import msgspec

TICKET_ISSUER: Final = "stylecast-app"
TICKET_AUDIENCE: Final = "stylecast-worker"
ALGORITHM: Final = "HS256"
# A ticket is fetched once the worker has admitted the connection (the `admitted` message), so it only has
# to outlive one round trip and the hello; the app's ledger reserves the stream's minutes for as long.
DEFAULT_TTL_SECONDS: Final = 30
# Tolerated clock skew between the app's and the worker's clocks.
LEEWAY_SECONDS: Final = 5
_REQUIRED_CLAIMS: Final = ("iss", "aud", "sub", "iat", "exp", "jti", "stream_id", "allowance")


class Ticket(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    stream_id: str
    allowance_seconds: int  # billable seconds the user has left when the stream starts
    expires_at: int  # Unix time; the ticket must be presented before this, the stream may outlive it
    ticket_id: str  # unique per ticket, so a worker can refuse a second use


class TicketError(Exception):
    """The token is not a ticket this worker accepts (forged, expired, malformed or for something else)."""


def issue_ticket(
    secret: str,
    *,
    user_id: str,
    stream_id: str,
    allowance_seconds: int,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    now: float | None = None,
) -> str:
    if not secret:
        raise ValueError("STREAM_SECRET is empty")
    if allowance_seconds < 0:
        raise ValueError("allowance_seconds must be >= 0")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be > 0")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": TICKET_ISSUER,
        "aud": TICKET_AUDIENCE,
        "sub": user_id,
        "stream_id": stream_id,
        "allowance": int(allowance_seconds),
        "iat": issued,
        "exp": issued + int(ttl_seconds),
        "jti": secrets.token_urlsafe(12),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_ticket(secret: str, token: str, *, now: float | None = None) -> Ticket:
    """Return the ticket's contents or raise TicketError saying why it was refused."""
    if not isinstance(token, str) or not token:
        raise TicketError("no ticket")
    try:
        # Expiry is checked below against `now`, so tests and replays can pin the clock.
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=TICKET_AUDIENCE,
            issuer=TICKET_ISSUER,
            options={"require": list(_REQUIRED_CLAIMS), "verify_exp": False, "verify_iat": False},
        )
    except jwt.InvalidSignatureError as exc:
        raise TicketError("ticket signature is invalid") from exc
    except jwt.InvalidAudienceError as exc:
        raise TicketError("token is not a stream ticket (wrong audience)") from exc
    except jwt.InvalidIssuerError as exc:
        raise TicketError("token is not a stream ticket (wrong issuer)") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TicketError(f"ticket lacks the {exc.claim!r} claim") from exc
    except jwt.InvalidTokenError as exc:
        raise TicketError(f"malformed ticket: {exc}") from exc

    current = time.time() if now is None else now
    try:
        expires_at = int(claims["exp"])
        issued_at = int(claims["iat"])
        ticket = Ticket(
            user_id=_nonempty_str(claims["sub"], "sub"),
            stream_id=_nonempty_str(claims["stream_id"], "stream_id"),
            allowance_seconds=_non_negative_int(claims["allowance"], "allowance"),
            expires_at=expires_at,
            ticket_id=_nonempty_str(claims["jti"], "jti"),
        )
    except (TypeError, ValueError) as exc:
        raise TicketError(f"malformed ticket: {exc}") from exc
    if current >= expires_at + LEEWAY_SECONDS:
        raise TicketError("ticket has expired")
    if issued_at > current + LEEWAY_SECONDS:
        raise TicketError("ticket is issued in the future")
    return ticket


def _nonempty_str(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _non_negative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return value
