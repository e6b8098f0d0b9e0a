"""Signed requests from the worker to the app (usage reports, stream claims), defined once.

Authentication is an HMAC-SHA256 over a purpose, a timestamp and the exact body, keyed with STREAM_SECRET:

    X-Stylecast-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "stylecast-<purpose>-v1.<t>.<body>")>

The purpose prefix separates each kind of request from the others and from every other use of the secret,
so a signed usage report can never be replayed as a claim. A request whose timestamp is more than
SIGNATURE_TOLERANCE_SECONDS away from the verifier's clock is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Final, TypeVar

import msgspec

SIGNATURE_HEADER: Final = "X-Stylecast-Signature"
SIGNATURE_TOLERANCE_SECONDS: Final = 300
# A report or a claim is a few hundred bytes of JSON; the app refuses larger bodies before reading them.
MAX_SIGNED_BODY_BYTES: Final = 4096
# Answers to a signed request that are worth retrying besides 5xx; any other 4xx is the app refusing it.
RETRY_STATUSES: Final = frozenset({408, 425, 429})

_T = TypeVar("_T")


class Purpose(StrEnum):
    USAGE = "usage"
    CLAIM = "claim"

    @property
    def label(self) -> str:
        return {Purpose.USAGE: "usage report", Purpose.CLAIM: "stream claim"}[self]


class SignedRequestError(Exception):
    """A request that must not be trusted (bad or missing signature, stale, malformed)."""


def _signature(secret: str, purpose: Purpose, timestamp: int, body: bytes) -> str:
    message = f"stylecast-{purpose.value}-v1.{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, *, timestamp: int, purpose: Purpose = Purpose.USAGE) -> str:
    """The value of SIGNATURE_HEADER for `body` signed at `timestamp`."""
    return f"t={timestamp},v1={_signature(secret, purpose, timestamp, body)}"


def encode_signed(
    secret: str, purpose: Purpose, message: msgspec.Struct, *, now: float | None = None
) -> tuple[bytes, dict[str, str]]:
    """The JSON body and headers of one signed request."""
    body = msgspec.json.encode(message)
    timestamp = int(time.time() if now is None else now)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature_header(secret, body, timestamp=timestamp, purpose=purpose),
    }
    return body, headers


def verify_signed(
    secret: str,
    purpose: Purpose,
    headers: Mapping[str, str],
    body: bytes,
    kind: type[_T],
    *,
    now: float | None = None,
    tolerance_seconds: int = SIGNATURE_TOLERANCE_SECONDS,
) -> _T:
    """The authenticated message, or SignedRequestError saying why it was refused."""
    label = purpose.label
    if len(body) > MAX_SIGNED_BODY_BYTES:
        raise SignedRequestError(f"{label} body is too large")
    value = headers.get(SIGNATURE_HEADER) or headers.get(SIGNATURE_HEADER.lower())
    if value is None:  # plain dicts are case-sensitive; HTTP header names are not
        value = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER.lower()), None)
    if not value:
        raise SignedRequestError(f"missing {SIGNATURE_HEADER} header")
    fields: dict[str, str] = {}
    for part in value.split(","):
        key, _, item = part.strip().partition("=")
        fields[key] = item
    try:
        timestamp = int(fields["t"])
        signature = fields["v1"]
    except (KeyError, ValueError) as exc:
        raise SignedRequestError(f"malformed {SIGNATURE_HEADER} header") from exc
    if not hmac.compare_digest(signature.encode(), _signature(secret, purpose, timestamp, body).encode()):
        raise SignedRequestError(f"{label} signature is invalid")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise SignedRequestError(f"{label} timestamp is outside the allowed window")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise SignedRequestError(f"malformed {label}: {exc}") from exc
