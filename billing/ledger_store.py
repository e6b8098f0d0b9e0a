"""The usage ledger as Clerk keeps it: usage reports, stream reservations and claims applied to the
metadata through the account store, batched per user, and the cached view the usage meter polls.

Clerk allows 1,000 Backend API requests per 10 s per instance and 10 metadata writes per 10 s per user, so
Clerk traffic per stream is budgeted (docs/metering.md, "A Clerk budget"):

* What decides money or minutes right now is written at once and its caller answered only once the write
  has succeeded: a claim, a stream's final report, a webhook. Writes for one user
  go through one queue: everything that arrives while a write is in flight, or within `min_write_interval`
  of the last one, is folded into the next write, and at most `writes_per_window` writes per
  `window_seconds` leave room for Clerk's per-user limit.
* A running stream's periodic report only moves its cumulative total. It is folded into the user's pending
  state and answered at once (`ReportApplied.durable` False); the pending state is written at most
  `deferred_write_seconds` after its first report, or with the user's next urgent write. The meter shows it
  at once. If the app stops before that write, nothing is lost while the worker lives: its next report
  carries the cumulative total again.
* A reservation (a ticket) is decided against the pending state and answered at once; it is written with
  the user's next write, which is normally its own claim a moment later. Nothing can stream on a ticket
  before its claim, and the claim is durable: if the app stops between the two, the claim finds no such
  stream and is refused, and the studio asks for a new ticket. So an unwritten reservation can cost a
  reconnect, never a second grant of the same minutes.

The rules themselves (what counts, what is reserved) are billing/ledger.py's. The app is one process
(docs/deployment.md), so the metadata this process last read or wrote is Clerk's, and a write patches only
what changed (billing/accounts.py).
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
    is_live,
    reserve_stream,
    restore_reservation,
)
from billing.metadata import BillingMetadata, LedgerEntry, MetadataError
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
    # Written to Clerk before this answer (final reports), or pending in this process (running streams).
    durable: bool = True


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
    # Running streams' latest reports, answered and not yet written (stream id -> report).
    deferred: dict[str, UsageReport] = field(default_factory=dict)
    # Reservations answered and not yet written (stream id -> the entry granted).
    reserved: dict[str, LedgerEntry] = field(default_factory=dict)
    # What the write in flight carries: pending until Clerk has it, so a ticket asked for meanwhile sees it.
    writing_reports: dict[str, UsageReport] = field(default_factory=dict)
    writing_reserved: dict[str, LedgerEntry] = field(default_factory=dict)
    flush: asyncio.TimerHandle | None = None

    @property
    def unwritten(self) -> bool:
        """Whether anything answered is not yet in Clerk."""
        return bool(self.deferred or self.reserved or self.writing_reports or self.writing_reserved)


class LedgerStore:
    def __init__(
        self,
        accounts: AccountStore,
        catalogue: PlanCatalogue,
        *,
        policy: LedgerPolicy = DEFAULT_POLICY,
        min_write_interval: float = 1.0,
        writes_per_window: int = 8,
        window_seconds: float = 10.0,
        deferred_write_seconds: float = 20.0,
        trust_own_write_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accounts = accounts
        self.catalogue = catalogue
        self.policy = policy
        self._min_interval = min_write_interval
        self._writes_per_window = writes_per_window
        self._window = window_seconds
        # Shorter than the ledger's stale_after_seconds, so what Clerk holds never lets a live stream's
        # reservation lapse, even for a process that starts afresh from it.
        self._trust_own_writes = trust_own_write_seconds
        self._deferred_write = min(deferred_write_seconds, policy.stale_after_seconds * 2 / 3)
        self._clock = clock
        self._monotonic = monotonic
        self._queues: dict[str, _UserQueue] = {}
        self._view_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ---- what the endpoints call ---------------------------------------------------------------------------

    async def record(self, report: UsageReport) -> ReportApplied:
        """Fold a verified usage report into its user's metadata. Raises LedgerRefused (never retry),
        AccountStoreError or MetadataError (retry later)."""
        if not report.final:
            deferred = self._defer(report)
            if deferred is not None:
                return deferred

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

    def _defer(self, report: UsageReport) -> ReportApplied | None:
        """Take a running stream's report without writing it, when this process holds the user's metadata
        to check it against; None sends it down the urgent path (which reads the account)."""
        account = self.accounts.cached(report.user_id)
        if account is None:
            return None
        queue = self._queue(report.user_id)
        now = int(self._clock())
        pending = self._pending_view(account.metadata, queue, now)
        folded = apply_report(pending, report, self.catalogue, now=now, policy=self.policy)  # may refuse
        kept = queue.deferred.get(report.stream_id)
        if kept is None or report.seconds >= kept.seconds:
            queue.deferred[report.stream_id] = report
        if queue.flush is None:
            loop = asyncio.get_running_loop()
            queue.flush = loop.call_later(self._deferred_write, self._flush_deferred, report.user_id)
        entry = folded.metadata.private.streams.get(report.stream_id)
        return ReportApplied(
            stream_id=report.stream_id,
            added_seconds=folded.added_seconds,
            stream_seconds=entry.seconds if entry is not None else report.seconds,
            counter=folded.counter,
            durable=False,
        )

    def _flush_deferred(self, user_id: str) -> None:
        queue = self._queues.get(user_id)
        if queue is None:
            return
        queue.flush = None
        if not queue.deferred:
            return

        def write_pending(metadata: BillingMetadata, now: int) -> tuple[BillingMetadata, None]:
            return metadata, None  # the batch folds the deferred reports in first

        task = asyncio.ensure_future(self._submit(user_id, write_pending))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _pending_view(self, metadata: BillingMetadata, queue: _UserQueue, now: int) -> BillingMetadata:
        """The metadata as it will be once everything answered and not yet in Clerk is written."""
        metadata = self._fold(metadata, queue.writing_reserved, queue.writing_reports, now)
        return self._fold(metadata, queue.reserved, queue.deferred, now)

    def _fold(
        self,
        metadata: BillingMetadata,
        reserved: dict[str, LedgerEntry],
        reports: dict[str, UsageReport],
        now: int,
    ) -> BillingMetadata:
        """The metadata with pending reservations and running streams' pending reports folded in."""
        for stream_id, entry in reserved.items():
            metadata = restore_reservation(metadata, stream_id, entry, now=now, policy=self.policy)
        for report in reports.values():
            try:
                folded = apply_report(metadata, report, self.catalogue, now=now, policy=self.policy)
                metadata = folded.metadata
            except LedgerRefused:
                continue  # refused when it arrived, or pruned since: it adds nothing
        return metadata

    async def claim(self, claim: StreamClaim) -> None:
        """Grant a verified stream claim, durably (written to Clerk before this returns). Raises
        LedgerRefused (already claimed, unknown, ended), AccountStoreError or MetadataError."""

        def grant(metadata: BillingMetadata, now: int) -> tuple[BillingMetadata, None]:
            return claim_stream(metadata, claim, now=now, policy=self.policy), None

        await self._submit(claim.user_id, grant)

    async def reserve(self, user_id: str) -> Reservation:
        """A new stream id with the seconds reserved for it, decided against the pending state and written
        with the user's next write (its claim). Raises LedgerRefused (OUT_OF_MINUTES, MINUTES_IN_USE),
        AccountStoreError or MetadataError."""
        account = await self._account(user_id)
        # From here to the end no await: two tickets asked for at once are decided one after the other.
        account = self.accounts.cached(user_id) or account
        queue = self._queue(user_id)
        now = int(self._clock())
        for stream_id, entry in list(queue.reserved.items()):
            if not is_live(stream_id, entry, now, self.policy):
                del queue.reserved[stream_id]  # its ticket can no longer be presented: it holds nothing
        pending = self._pending_view(account.metadata, queue, now)
        reservation = reserve_stream(pending, self.catalogue, now=now, policy=self.policy)
        queue.reserved[reservation.stream_id] = reservation.metadata.private.streams[reservation.stream_id]
        return reservation

    async def view(self, user_id: str) -> Account:
        """The account as the meter shows it: the store's cached view, which every write refreshes, with
        what is not yet written folded in. Only when it has expired is Clerk asked, once, however many
        polls are waiting for it."""
        account = await self._account(user_id)
        queue = self._queues.get(user_id)
        if queue is None or not queue.unwritten:
            return account
        pending = self._pending_view(account.metadata, queue, int(self._clock()))
        return msgspec.structs.replace(account, metadata=pending)

    async def _account(self, user_id: str) -> Account:
        """The cached account, or Clerk's, read once however many callers are waiting for it."""
        account = self.accounts.cached(user_id)
        if account is not None:
            return account
        lock = self._view_locks.get(user_id)
        if lock is None:
            lock = self._view_locks[user_id] = asyncio.Lock()
        async with lock:
            return self.accounts.cached(user_id) or await self.accounts.get(user_id)

    # ---- the per-user write queue --------------------------------------------------------------------------

    def _queue(self, user_id: str) -> _UserQueue:
        queue = self._queues.get(user_id)
        if queue is None:
            self._forget_idle_queues()
            queue = self._queues[user_id] = _UserQueue()
        return queue

    async def _submit(self, user_id: str, operation: Operation[_R]) -> _R:
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        queue = self._queue(user_id)
        # A caller that went away leaves its outcome unread; reading it here keeps asyncio from logging it.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        queue.pending.append(_Pending(operation, future))
        if queue.task is None or queue.task.done():
            queue.task = asyncio.create_task(self._drain(user_id, queue), name=f"ledger-{user_id}")
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
        # The running streams' pending reports and the pending reservations ride along with every write.
        deferred, queue.deferred = queue.deferred, {}
        reserved, queue.reserved = queue.reserved, {}
        queue.writing_reports, queue.writing_reserved = deferred, reserved
        if queue.flush is not None:
            queue.flush.cancel()
            queue.flush = None

        def change(account: Account) -> BillingMetadata | None:
            nonlocal wrote
            # Called with the account's current metadata; the whole batch becomes one write.
            now = int(self._clock())
            metadata = self._fold(account.metadata, reserved, deferred, now)
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
            await self.accounts.update(user_id, change, trust_own_write_seconds=self._trust_own_writes)
        except (AccountStoreError, MetadataError) as error:
            log.warning("ledger write for %s failed (%d waiting): %s", user_id, len(batch), error)
            self._keep_deferred(user_id, queue, deferred, reserved)
            _settle(batch, [error] * len(batch))
            return
        except Exception as error:
            # A bug must not leave callers waiting forever; they answer 500 and the worker retries.
            log.exception("ledger write for %s failed unexpectedly", user_id)
            self._keep_deferred(user_id, queue, deferred, reserved)
            _settle(batch, [error] * len(batch))
            return
        finally:
            queue.writing_reports, queue.writing_reserved = {}, {}
            if wrote:
                queue.writes.append(self._monotonic())
        _settle(batch, outcomes)

    def _keep_deferred(
        self,
        user_id: str,
        queue: _UserQueue,
        deferred: dict[str, UsageReport],
        reserved: dict[str, LedgerEntry],
    ) -> None:
        """A failed write's pending reports and reservations wait for the next one (newer reports of a
        stream win)."""
        for stream_id, entry in reserved.items():
            queue.reserved.setdefault(stream_id, entry)
        for stream_id, report in deferred.items():
            newer = queue.deferred.get(stream_id)
            if newer is None or report.seconds > newer.seconds:
                queue.deferred[stream_id] = report
        if queue.deferred and queue.flush is None:
            loop = asyncio.get_running_loop()
            queue.flush = loop.call_later(self._deferred_write, self._flush_deferred, user_id)

    def _forget_idle_queues(self) -> None:
        """Bound the memory of write budgets: drop queues with nothing pending and no write in the window."""
        if len(self._queues) < 1024:
            return
        now = self._monotonic()
        now_s = int(self._clock())
        for user_id, queue in list(self._queues.items()):
            holds = any(is_live(sid, entry, now_s, self.policy) for sid, entry in queue.reserved.items())
            idle = (
                not queue.pending
                and not queue.deferred
                and not holds
                and (queue.task is None or queue.task.done())
            )
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


__all__ = ["LedgerStore", "ReportApplied"]
