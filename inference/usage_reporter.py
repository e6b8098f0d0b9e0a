"""Usage reports from the worker to the app: signing, verification and the reporter that posts them.

Reports are signed requests (inference/signing.py, purpose "usage"). A replay inside the signature's
window is harmless because reports are cumulative (the app keeps the maximum).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

import httpx

from inference.protocol import UsageReport
from inference.signing import (
    RETRY_STATUSES,
    SIGNATURE_HEADER,
    SIGNATURE_TOLERANCE_SECONDS,
    Purpose,
    SignedRequestError,
    encode_signed,
    verify_signed,
)
from inference.signing import signature_header as signed_header
from inference.tickets import Ticket

log = logging.getLogger(__name__)

UsageReportError = SignedRequestError
# A live stream whose total has not changed is reported every HEARTBEAT_INTERVALS * interval seconds.
HEARTBEAT_INTERVALS: Final = 2


def signature_header(secret: str, body: bytes, *, timestamp: int) -> str:
    """The value of SIGNATURE_HEADER for a usage report `body` signed at `timestamp`."""
    return signed_header(secret, body, timestamp=timestamp, purpose=Purpose.USAGE)


def encode_usage_report(
    secret: str, report: UsageReport, *, now: float | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one report request."""
    return encode_signed(secret, Purpose.USAGE, report, now=now)


def verify_usage_report(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_seconds: int = SIGNATURE_TOLERANCE_SECONDS,
) -> UsageReport:
    """For the app's `POST /api/usage/report`: the authenticated report, or UsageReportError."""
    return verify_signed(
        secret, Purpose.USAGE, headers, body, UsageReport, now=now, tolerance_seconds=tolerance_seconds
    )


__all__ = [
    "SIGNATURE_HEADER",
    "ReportedStream",
    "UsageReportError",
    "UsageReporter",
    "encode_usage_report",
    "signature_header",
    "verify_usage_report",
]


class ReportedStream:
    """One stream whose usage the reporter posts; `finish()` when the stream ends to send its final
    report."""

    def __init__(self, ticket: Ticket, seconds: Callable[[], int]) -> None:
        self.ticket = ticket
        self.seconds = seconds  # the stream's cumulative billable seconds, read at each attempt
        self.done = asyncio.Event()
        self.reported = -1  # last value the app acknowledged
        self.task: asyncio.Task[None] | None = None

    def finish(self) -> None:
        self.done.set()


class UsageReporter:
    """Posts each stream's cumulative billable seconds to the app: every `interval` seconds while they
    grow, and once at the end with final=true. Failed posts are retried with exponential backoff in the
    stream's own task, so a slow or absent app never holds up a frame."""

    def __init__(
        self,
        *,
        url: str,
        secret: str,
        worker_id: str,
        interval: float = 5.0,
        retry_base: float = 0.5,
        retry_max: float = 8.0,
        final_attempts: int = 8,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.secret = secret
        self.worker_id = worker_id
        self.interval = interval
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.final_attempts = final_attempts
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self._owns_client = client is None
        self._streams: set[ReportedStream] = set()

    def open(self, ticket: Ticket, seconds: Callable[[], int]) -> ReportedStream:
        stream = ReportedStream(ticket, seconds)
        stream.task = asyncio.create_task(self._run(stream), name=f"usage-{ticket.stream_id}")
        self._streams.add(stream)
        stream.task.add_done_callback(lambda _: self._streams.discard(stream))
        return stream

    async def aclose(self, grace_seconds: float = 10.0) -> None:
        """Let final reports go out (for up to `grace_seconds`), then give up on the rest, loudly."""
        for stream in self._streams:
            stream.finish()
        tasks = [stream.task for stream in self._streams if stream.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_seconds)
            for stream in list(self._streams):
                if stream.task in late:
                    log.error(
                        "usage of stream %s (user %s) not reported at shutdown: %d seconds",
                        stream.ticket.stream_id,
                        stream.ticket.user_id,
                        stream.seconds(),
                    )
                    stream.task.cancel()
            if late:
                await asyncio.wait(late)
        if self._owns_client:
            await self._client.aclose()

    async def _run(self, stream: ReportedStream) -> None:
        loop = asyncio.get_running_loop()
        next_due = loop.time() + self.interval
        last_sent = loop.time()
        while not await _wait(stream.done, next_due - loop.time()):
            # Schedule from the due time, not from when the post finished, so reports stay `interval` apart.
            next_due = max(next_due + self.interval, loop.time())
            # An unchanged total is still sent now and then: it tells the app the stream is alive (a
            # paused tab), so the app does not fold the stream and release its reserved allowance.
            heartbeat_due = loop.time() - last_sent >= HEARTBEAT_INTERVALS * self.interval
            if stream.seconds() != stream.reported or heartbeat_due:
                await self._deliver(stream, final=False)
                last_sent = loop.time()
        await self._deliver(stream, final=True)

    async def _deliver(self, stream: ReportedStream, *, final: bool) -> None:
        attempt = 0
        while True:
            # Rebuilt per attempt: a retry carries the latest cumulative total, never a stale one.
            seconds = stream.seconds()
            report = UsageReport(
                stream_id=stream.ticket.stream_id,
                user_id=stream.ticket.user_id,
                worker_id=self.worker_id,
                seconds=seconds,
                final=final,
                sent_at=time.time(),
            )
            outcome = await self._post(report)
            if outcome != "retry":
                stream.reported = seconds
                return
            attempt += 1
            if final and attempt >= self.final_attempts:
                log.error(
                    "gave up on the final usage report of stream %s (user %s, %d seconds) after %d attempts",
                    stream.ticket.stream_id,
                    stream.ticket.user_id,
                    seconds,
                    attempt,
                )
                return
            delay = min(self.retry_base * 2 ** (attempt - 1), self.retry_max)
            if final:
                await asyncio.sleep(delay)
            elif await _wait(stream.done, delay):
                return  # the stream ended meanwhile; its final report carries this total

    async def _post(self, report: UsageReport) -> str:
        """ "ok", "retry" (network error, 5xx, 408/425/429) or "rejected" (any other 4xx: retrying a
        request the app refuses, e.g. for a wrong secret, cannot succeed)."""
        body, headers = encode_usage_report(self.secret, report)
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("usage report for stream %s failed: %s", report.stream_id, exc)
            return "retry"
        if response.is_success:
            return "ok"
        if response.status_code >= 500 or response.status_code in RETRY_STATUSES:
            log.warning("usage report for stream %s: HTTP %d", report.stream_id, response.status_code)
            return "retry"
        log.error(
            "usage report for stream %s rejected by the app: HTTP %d %s",
            report.stream_id,
            response.status_code,
            response.text[:200],
        )
        return "rejected"


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for the event at most `seconds`; True if it is set."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout=max(seconds, 0))
    except TimeoutError:
        return event.is_set()
    return True
