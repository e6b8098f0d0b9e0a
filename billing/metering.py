"""Metering in the web app: usage reports and stream reservations applied to Clerk through the account
store, batched per user, and the cached view the usage meter polls.

Clerk allows 10 metadata writes per 10 seconds per user. A user's worker reports every few seconds per
stream, tickets are issued on every (re)connect, and webhooks write too, so writes for one user go
through one queue here: everything that arrives while a write is in flight, or within
`min_write_interval` of the last one, is folded into the next write together, and at most
`writes_per_window` writes per `window_seconds` leave room for webhooks. A caller is answered only once
the write that contains its change has succeeded (or with the store's error if it failed), so a worker
that gets a 200 knows its report is durable, and one that gets an error retries it; the ledger makes the
retry harmless whether or not the failed write reached Clerk.

The rules themselves (what counts, what is reserved) are billing/ledger.py's, applied to the metadata
read afresh from Clerk inside the write (`AccountStore.update`). See docs/metering.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from billing.accounts import Account, AccountStore, AccountStoreError
from billing.entitlement import Counter
from billing.ledger import (
    DEFAULT_POLICY,
    LedgerPolicy,
    LedgerRefused,
    Reservation,
    apply_report,
    claim_stream,
    reserve_stream,
)
from billing.metadata import BillingMetadata, MetadataError
from billing.plans import PlanCatalogue
from inference.protocol import StreamClaim, UsageReport

log = logging.getLogger(__name__)

_R = TypeVar("_R")
# A change to one user's metadata: (metadata, now) -> (new metadata, what to tell the caller).
Operation = Callable[[BillingMetadata, int], tuple[BillingMetadata, _R]]


class ReportApplied(msgspec.Struct, frozen=True, kw_only=True):
    stream_id: str
    # Seconds this report added to the account (0 for a duplicate, a retry or a late report).
    added_seconds: int
    # The stream's cumulative billed seconds after this report.
    stream_seconds: int
    counter: Counter


@dataclass(eq=False)
class _Pending(Generic[_R]):
    operation: Operation[_R]
    future: asyncio.Future[_R]


@dataclass(eq=False)
class _UserQueue:
    pending: list[_Pending[Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    # Monotonic times of this user's recent metadata writes, for the per-user write budget.
    writes: deque[float] = field(default_factory=deque)


class Metering:
    def __init__(
        self,
        accounts: AccountStore,
        catalogue: PlanCatalogue,
        *,
        policy: LedgerPolicy = DEFAULT_POLICY,
        min_write_interval: float = 1.0,
        writes_per_window: int = 8,
        window_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accounts = accounts
        self.catalogue = catalogue
        self.policy = policy
        self._min_interval = min_write_interval
        self._writes_per_window = writes_per_window
        self._window = window_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._queues: dict[str, _UserQueue] = {}
        self._view_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ---- what the endpoints call ---------------------------------------------------------------------------

    async def record(self, report: UsageReport) -> ReportApplied:
        """Fold a verified usage report into its user's metadata. Raises LedgerRefused (never retry),
        AccountStoreError or MetadataError (retry later)."""

        def fold(metadata: BillingMetadata, now: int) -> tuple[BillingMetadata, ReportApplied]:
            folded = apply_report(metadata, report, self.catalogue, now=now, policy=self.policy)
            entry = folded.metadata.private.streams.get(report.stream_id)
            applied = ReportApplied(
                stream_id=report.stream_id,
                added_seconds=folded.added_seconds,
                # A stream pruned at once (a tiny ledger) was still counted: its total is what it reported.
                stream_seconds=entry.seconds if entry is not None else report.seconds,
                counter=folded.counter,
            )
            return folded.metadata, applied

        return await self._submit(report.user_id, fold)

    async def reserve(self, user_id: str) -> Reservation:
        """A new stream id with the seconds reserved for it. Raises LedgerRefused (OUT_OF_MINUTES,
        MINUTES_IN_USE), AccountStoreError or MetadataError."""

        def reserve(metadata: BillingMetadata, now: int) -> tuple[BillingMetadata, Reservation]:
            reservation = reserve_stream(metadata, self.catalogue, now=now, policy=self.policy)
            return reservation.metadata, reservation

        return await self._submit(user_id, reserve)

    async def claim(self, claim: StreamClaim) -> None:
        """Grant a verified stream claim, durably (written to Clerk before this returns). Raises
        LedgerRefused (already claimed, unknown, ended), AccountStoreError or MetadataError."""

        def grant(metadata: BillingMetadata, now: int) -> tuple[BillingMetadata, None]:
            return claim_stream(metadata, claim, now=now, policy=self.policy), None

        await self._submit(claim.user_id, grant)

    async def view(self, user_id: str) -> Account:
        """The account as the meter shows it: the store's cached view, which every write refreshes. Only
        when it has expired is Clerk asked, once, however many polls are waiting for it."""
        account = self.accounts.cached(user_id)
        if account is not None:
            return account
        lock = self._view_locks.get(user_id)
        if lock is None:
            lock = self._view_locks[user_id] = asyncio.Lock()
        async with lock:
            return self.accounts.cached(user_id) or await self.accounts.get(user_id)

    # ---- the per-user write queue --------------------------------------------------------------------------

    async def _submit(self, user_id: str, operation: Operation[_R]) -> _R:
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(user_id)
        if queue is None:
            self._forget_idle_queues()
            queue = self._queues[user_id] = _UserQueue()
        # A caller that went away leaves its outcome unread; reading it here keeps asyncio from logging it.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        queue.pending.append(_Pending(operation, future))
        if queue.task is None or queue.task.done():
            queue.task = asyncio.create_task(self._drain(user_id, queue), name=f"metering-{user_id}")
        # The write goes ahead even if the caller gives up (a worker timing out): its retry then finds the
        # report already counted.
        return await asyncio.shield(future)

    async def _drain(self, user_id: str, queue: _UserQueue) -> None:
        while queue.pending:
            await asyncio.sleep(self._delay_before_write(queue))
            batch, queue.pending = queue.pending, []
            await self._write_batch(user_id, queue, batch)

    def _delay_before_write(self, queue: _UserQueue) -> float:
        now = self._monotonic()
        while queue.writes and now - queue.writes[0] >= self._window:
            queue.writes.popleft()
        ready = now
        if queue.writes:
            ready = max(ready, queue.writes[-1] + self._min_interval)
        if len(queue.writes) >= self._writes_per_window:
            ready = max(ready, queue.writes[0] + self._window)
        return max(0.0, ready - now)

    async def _write_batch(self, user_id: str, queue: _UserQueue, batch: list[_Pending[Any]]) -> None:
        outcomes: list[object] = [None] * len(batch)
        wrote = False

        def change(account: Account) -> BillingMetadata | None:
            nonlocal wrote
            # Called with the metadata read afresh from Clerk; the whole batch becomes one write.
            metadata = account.metadata
            now = int(self._clock())
            for index, pending in enumerate(batch):
                try:
                    metadata, outcomes[index] = pending.operation(metadata, now)
                except LedgerRefused as refused:
                    outcomes[index] = refused
            if metadata == account.metadata:
                return None
            wrote = True
            return metadata

        try:
            await self.accounts.update(user_id, change)
        except (AccountStoreError, MetadataError) as error:
            log.warning("metering write for %s failed (%d waiting): %s", user_id, len(batch), error)
            _settle(batch, [error] * len(batch))
            return
        except Exception as error:
            # A bug must not leave callers waiting forever; they answer 500 and the worker retries.
            log.exception("metering write for %s failed unexpectedly", user_id)
            _settle(batch, [error] * len(batch))
            return
        finally:
            if wrote:
                queue.writes.append(self._monotonic())
        _settle(batch, outcomes)

    def _forget_idle_queues(self) -> None:
        """Bound the memory of write budgets: drop queues with nothing pending and no write in the window."""
        if len(self._queues) < 1024:
            return
        now = self._monotonic()
        for user_id, queue in list(self._queues.items()):
            idle = not queue.pending and (queue.task is None or queue.task.done())
            if idle and (not queue.writes or now - queue.writes[-1] >= self._window):
                del self._queues[user_id]


def _settle(batch: list[_Pending[Any]], outcomes: list[object]) -> None:
    for pending, outcome in zip(batch, outcomes, strict=True):
        if pending.future.done():
            continue
        if isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)


__all__ = ["Metering", "ReportApplied"]
