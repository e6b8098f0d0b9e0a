"""Building the Clerk Backend API client and the user look-ups the app makes through it.

The same code runs against api.clerk.com and, in sandbox mode, against the emulator mounted in our own
process; only `api_url` and the secret key differ.
"""

from __future__ import annotations

import re

from clerk_backend_api import Clerk, models
from clerk_backend_api.utils import BackoffStrategy, RetryConfig

# The SDK's default retries 5XX and connection errors with backoff for up to an hour. A web request
# waiting on that would hang for the user; we would rather fail fast and show an error.
_NO_RETRIES = RetryConfig("none", BackoffStrategy(0, 0, 1.0, 0), retry_connection_errors=False)

_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_DOMAIN_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def create_clerk_client(secret_key: str, api_url: str, *, timeout_ms: int = 5000) -> Clerk:
    """A Clerk SDK client for `api_url` (e.g. "https://api.clerk.com/v1") that never retries and gives
    up on a request after `timeout_ms`."""
    if not secret_key:
        raise ValueError("a Clerk secret key is required")
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
    return Clerk(
        bearer_auth=secret_key,
        server_url=api_url.rstrip("/"),
        retry_config=_NO_RETRIES,
        timeout_ms=timeout_ms,
    )


def normalize_email(email: str) -> str:
    """The address trimmed and lower-cased, as Clerk stores it; ValueError when it is not an address."""
    candidate = email.strip().lower() if isinstance(email, str) else ""
    local, at, domain = candidate.rpartition("@")
    labels = domain.split(".")
    if (
        not at
        or len(candidate) > 254
        or not 0 < len(local) <= 64
        or not _LOCAL_PART.match(local)
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
        or len(labels) < 2
        or not all(_DOMAIN_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(f"not a valid email address: {email!r}")
    return candidate


async def _find_by_email(clerk: Clerk, email: str) -> models.User | None:
    users = await clerk.users.list_async(request={"email_address": [email], "limit": 1})
    return users[0] if users else None


async def find_or_create_user_by_email(clerk: Clerk, email: str) -> models.User:
    """The Clerk user who owns `email`, created when there is none.

    Two requests for a new address can race (two tabs, a retried form): the loser's create fails with
    `form_identifier_exists`, and it then finds the winner's user instead of failing.
    """
    address = normalize_email(email)
    existing = await _find_by_email(clerk, address)
    if existing is not None:
        return existing
    try:
        return await clerk.users.create_async(email_address=[address])
    except models.ClerkErrors as error:
        if not any(item.code == "form_identifier_exists" for item in error.data.errors):
            raise
    winner = await _find_by_email(clerk, address)
    if winner is None:
        raise RuntimeError(f"Clerk reports {address} as taken, yet no user with that address is listed")
    return winner
