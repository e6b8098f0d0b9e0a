"""The account store: billing metadata read from and written to Clerk through the async SDK.

Clerk is our only database, and pages (the usage meter refreshes every few seconds) would otherwise hit
its rate limits, so reads are cached in-process for `ttl_seconds`. Every write replaces the cached entry
with what Clerk answered, so this process always sees its own writes at once. The web app runs as one
process (docs/deployment.md) and every billing write goes through it, so a change made elsewhere (by hand
in Clerk's dashboard) shows within `ttl_seconds`.

Writes are minimal merge patches against the state just read (billing.metadata.metadata_patch), and
read-modify-write cycles for one user are serialised within the process, so a webhook and a usage
report landing together cannot drop each other's change. `update` reads Clerk afresh first, unless the
caller trusts this process's own recent write (metering's steady writes, docs/metering.md).

A user id goes into the Clerk SDK's URL path as it is (the SDK does not encode it), so anything that is
not a Clerk user id is refused here, before any request: `users.get("../users")` would list every user.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import msgspec
from clerk_backend_api import Clerk, models

from billing.ids import is_clerk_user_id
from billing.metadata import SCHEMA_VERSION, BillingMetadata, Migrated, metadata_patch, read_metadata

log = logging.getLogger(__name__)

# Views (the meter's polls) are served from here this long; this process's writes refresh them at once.
DEFAULT_TTL_SECONDS = 30.0
DEFAULT_MAX_CACHED = 10_000
# Below the SDK's HTTP client pool (httpx keeps 20 connections alive), so calls reuse connections.
DEFAULT_MAX_CONCURRENT_CALLS = 16


class AccountStoreError(Exception):
    """Clerk could not give or take the account's metadata."""


class ClerkUnavailable(AccountStoreError):
    """Clerk failed transiently (5xx, 429, timeout, connection): the same call may succeed later."""


class ClerkRejected(AccountStoreError):
    """Clerk refused the request (4xx other than an unknown user): retrying the same call will not help."""


class UnknownUser(AccountStoreError):
    """No Clerk user has this id."""


class InvalidUserId(UnknownUser):
    """Not a Clerk user id at all, so no user can have it; refused without asking Clerk."""


class Account(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    email: str | None
    metadata: BillingMetadata
    # What the stored copy needs from the next write when an older schema wrote it (metadata_patch).
    stored: Migrated | None = None


class AccountStore:
    def __init__(
        self,
        clerk: Clerk,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_cached: int = DEFAULT_MAX_CACHED,
        max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clerk = clerk
        # Calls beyond this wait here, in arrival order, rather than in the HTTP client's connection pool,
        # whose queue costs CPU per waiting request and per event (a burst of cache misses then starves the
        # event loop). Clerk's instance limit (100 requests a second) needs only a few calls in flight.
        self._calls = asyncio.Semaphore(max_concurrent_calls)
        self._ttl = ttl_seconds
        self._max_cached = max_cached
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Account]] = OrderedDict()
        # When this process last wrote each cached account (monotonic); dropped with the cache entry.
        self._written_at: dict[str, float] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def cached(self, user_id: str) -> Account | None:
        """The cached view if it is still fresh; never calls Clerk."""
        entry = self._cache.get(user_id)
        if entry is None or entry[0] < self._clock():
            return None
        return entry[1]

    def invalidate(self, user_id: str) -> None:
        self._cache.pop(user_id, None)
        self._written_at.pop(user_id, None)

    async def get(self, user_id: str, *, fresh: bool = False) -> Account:
        """The user's account: from the cache unless it is stale or `fresh` is asked for."""
        _check_user_id(user_id)
        if not fresh and (account := self.cached(user_id)) is not None:
            return account
        async with self._calls:
            user = await _clerk_call(self._clerk.users.get_async(user_id=user_id), user_id)
        return self._remember(user)

    async def update(
        self,
        user_id: str,
        change: Callable[[Account], BillingMetadata | None],
        *,
        trust_own_write_seconds: float = 0.0,
    ) -> Account:
        """Read the account afresh, let `change` compute its new metadata (None: leave it), write the
        difference. Serialised per user within this process.

        `trust_own_write_seconds`: skip the read when this process wrote the account that recently. The app
        is one process and every write to billing metadata goes through it, so what it last wrote is what
        Clerk holds; this halves the requests of a steady stream of writes (docs/metering.md)."""
        _check_user_id(user_id)
        async with self._lock_for(user_id):
            written = self._written_at.get(user_id)
            own = self._cache.get(user_id) if written is not None else None
            if own is not None and written is not None and self._clock() - written < trust_own_write_seconds:
                account = own[1]
            else:
                account = await self.get(user_id, fresh=True)
            new = change(account)
            if new is None:
                return account
            return await self._write(account, new)

    async def _write(self, account: Account, new: BillingMetadata) -> Account:
        public, private = metadata_patch(account.metadata, new, stored=account.stored)
        if public is None and private is None:
            return account
        try:
            async with self._calls:
                user = await _clerk_call(
                    self._clerk.users.update_metadata_async(
                        user_id=account.user_id, public_metadata=public, private_metadata=private
                    ),
                    account.user_id,
                )
        except AccountStoreError:
            # The write may have landed although its answer was lost: only a fresh read can tell.
            self.invalidate(account.user_id)
            raise
        remembered = self._remember(user)
        self._written_at[user.id] = self._clock()
        return remembered

    def _remember(self, user: models.User) -> Account:
        stored = read_metadata(user.public_metadata, user.private_metadata)
        account = Account(
            user_id=user.id,
            email=_primary_email(user),
            metadata=stored.metadata,
            stored=stored if stored.retired_private_keys or _older(stored) else None,
        )
        self._cache[user.id] = (self._clock() + self._ttl, account)
        self._cache.move_to_end(user.id)
        while len(self._cache) > self._max_cached:
            evicted, _ = self._cache.popitem(last=False)
            self._written_at.pop(evicted, None)
        return account

    def _lock_for(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[user_id] = lock
        return lock


_T = TypeVar("_T")


def _check_user_id(user_id: str) -> None:
    if not is_clerk_user_id(user_id):
        raise InvalidUserId(f"{user_id[:60]!r} is not a Clerk user id")


def _older(stored: Migrated) -> bool:
    return any(
        version is not None and version < SCHEMA_VERSION
        for version in (stored.public_version, stored.private_version)
    )


async def _clerk_call(request: Awaitable[_T], user_id: str) -> _T:
    try:
        return await request
    except models.ClerkErrors as error:
        if error.status_code == 404:
            raise UnknownUser(user_id) from error
        codes = ", ".join(item.code for item in error.data.errors)
        raise ClerkRejected(f"Clerk refused ({error.status_code}: {codes})") from error
    except models.SDKError as error:
        status = error.status_code
        if status >= 500 or status == 429:
            raise ClerkUnavailable(f"Clerk answered {status}") from error
        if status == 404:
            raise UnknownUser(user_id) from error
        raise ClerkRejected(f"Clerk answered {status}") from error
    except (httpx.HTTPError, models.NoResponseError) as error:
        raise ClerkUnavailable(f"Clerk unreachable: {type(error).__name__}") from error


def _primary_email(user: models.User) -> str | None:
    addresses = user.email_addresses or []
    for address in addresses:
        if address.id == user.primary_email_address_id:
            return address.email_address
    return addresses[0].email_address if addresses else None
