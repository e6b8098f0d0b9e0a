"""The worker reports each stream's billable seconds to the app: signed, cumulative, final once, and
retried while the app is down. The app side is a real Litestar endpoint on a socket that verifies the
signature exactly as the web app does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from litestar import Litestar, Request, Response, post
from websockets.exceptions import ConnectionClosed

from inference.protocol import CloseCode, Ready, StreamClaim, Usage, UsageReport
from inference.signing import Purpose, SignedRequestError, verify_signed
from inference.usage_reporter import UsageReportError, verify_usage_report
from tests.inference.helpers import (
    SECRET,
    FakeClock,
    StreamClient,
    new_ticket,
    running_worker,
    wait_for,
    webcam_jpeg,
    worker_config,
)
from tests.live_server import serve


@dataclass
class Receiver:
    """What the app's `POST /api/usage/report` saw."""

    secret: str = SECRET
    up: threading.Event = field(default_factory=threading.Event)  # clear: answer 503, as an app that is down
    reports: list[UsageReport] = field(default_factory=list)
    attempts: int = 0
    refused: list[str] = field(default_factory=list)
    claims: list[StreamClaim] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[UsageReport]:
        with self.lock:
            return list(self.reports)


@contextmanager
def usage_receiver(receiver: Receiver) -> Iterator[str]:
    @post("/api/usage/report", status_code=204)
    async def report(request: Request) -> Response[None]:
        body = await request.body()
        with receiver.lock:
            receiver.attempts += 1
        if not receiver.up.is_set():
            return Response(None, status_code=503)
        try:
            accepted = verify_usage_report(receiver.secret, request.headers, body)
        except UsageReportError as exc:
            receiver.refused.append(str(exc))
            return Response(None, status_code=401)
        with receiver.lock:
            receiver.reports.append(accepted)
        return Response(None, status_code=204)

    @post("/api/stream/claim", status_code=200)
    async def claim(request: Request) -> Response[None]:
        # The app's rule, for the worker's side of it: the first claim of a stream wins.
        if not receiver.up.is_set():
            return Response(None, status_code=503)
        try:
            claimed = verify_signed(
                receiver.secret, Purpose.CLAIM, request.headers, await request.body(), StreamClaim
            )
        except SignedRequestError as exc:
            receiver.refused.append(str(exc))
            return Response(None, status_code=401)
        with receiver.lock:
            if any(seen.stream_id == claimed.stream_id for seen in receiver.claims):
                return Response(None, status_code=409)
            receiver.claims.append(claimed)
        return Response(None, status_code=200)

    with serve(Litestar(route_handlers=[report, claim])) as url:
        yield f"{url}/api/usage/report"


def _stream_seconds(client: StreamClient, clock: FakeClock, seconds: int, first_frame_id: int = 1) -> None:
    """Deliver one frame in each of `seconds` consecutive wall-clock seconds."""
    jpeg = webcam_jpeg(160, 120)
    for offset in range(seconds):
        client.send_frame(first_frame_id + offset, jpeg)
        client.frame(first_frame_id + offset)
        client.receive_until(lambda message: isinstance(message, Usage))  # each new second is announced
        clock.advance(1)


def test_reports_are_cumulative_and_the_final_one_is_sent_once() -> None:
    receiver = Receiver()
    receiver.up.set()
    clock = FakeClock()
    with usage_receiver(receiver) as url:
        config = worker_config(usage_report_url=url, usage_report_interval_seconds=0.25)
        with running_worker(config, clock=clock) as running:
            ticket = new_ticket(allowance_seconds=600, user_id="user_42")
            with StreamClient.connect(running.ws_url) as client:
                client.start(ticket)
                _stream_seconds(client, clock, 3)
                wait_for(lambda: any(r.seconds == 3 for r in receiver.accepted()), timeout=5)
                _stream_seconds(client, clock, 2, first_frame_id=10)
                wait_for(lambda: any(r.seconds == 5 for r in receiver.accepted()), timeout=5)
                seen_by_user = client.messages(Usage)[-1].seconds_used
            # The client hung up: exactly one final report follows, with the whole total.
            wait_for(lambda: any(r.final for r in receiver.accepted()), timeout=5)
            time.sleep(0.6)  # more than two report intervals: nothing may follow the final report

    reports = receiver.accepted()
    assert {(r.stream_id, r.user_id, r.worker_id) for r in reports} == {
        (reports[0].stream_id, "user_42", "test-worker")
    }
    totals = [r.seconds for r in reports]
    assert totals == sorted(totals), "cumulative: never goes down"
    assert [r.final for r in reports].count(True) == 1
    assert reports[-1].final
    assert reports[-1].seconds == 5 == seen_by_user
    assert receiver.refused == []


def test_reports_are_retried_with_backoff_while_the_app_is_down() -> None:
    receiver = Receiver()
    receiver.up.set()
    clock = FakeClock()
    with usage_receiver(receiver) as url:
        config = worker_config(
            usage_report_url=url, usage_report_interval_seconds=0.1, usage_retry_base_seconds=0.05
        )
        with running_worker(config, clock=clock) as running, StreamClient.connect(running.ws_url) as client:
            client.start(new_ticket())  # claimed while the app is up; it goes down after
            receiver.up.clear()
            _stream_seconds(client, clock, 1)
            wait_for(lambda: receiver.attempts >= 2, timeout=5)
            # Frames keep flowing while the reports fail: the stream never waits for the app.
            started = time.monotonic()
            _stream_seconds(client, clock, 2, first_frame_id=10)
            assert time.monotonic() - started < 2
            wait_for(lambda: receiver.attempts >= 4, timeout=5)
            receiver.up.set()
            wait_for(lambda: len(receiver.accepted()) >= 1, timeout=5)
            client.connection.close()
            wait_for(lambda: any(r.final for r in receiver.accepted()), timeout=5)

    reports = receiver.accepted()
    assert receiver.attempts > len(reports) + 3
    assert reports[0].seconds == 3, "a retry carries the latest cumulative total, not the failed one"
    assert reports[-1].final
    assert reports[-1].seconds == 3


def test_the_final_report_is_sent_when_the_allowance_ends_the_stream() -> None:
    receiver = Receiver()
    receiver.up.set()
    clock = FakeClock()
    with usage_receiver(receiver) as url:
        config = worker_config(usage_report_url=url, usage_report_interval_seconds=5)
        with running_worker(config, clock=clock) as running, StreamClient.connect(running.ws_url) as client:
            client.start(new_ticket(allowance_seconds=2))
            _stream_seconds(client, clock, 2)
            assert client.wait_closed(timeout=3) == CloseCode.ALLOWANCE_USED
            wait_for(lambda: any(r.final for r in receiver.accepted()), timeout=5)

    (final,) = receiver.accepted()  # the stream was shorter than one report interval
    assert (final.seconds, final.final) == (2, True)


def test_a_worker_with_another_secret_can_neither_claim_nor_report() -> None:
    receiver = Receiver(secret="the-apps-secret-is-different-0123456789")
    receiver.up.set()
    with usage_receiver(receiver) as url:
        config = worker_config(usage_report_url=url, usage_report_interval_seconds=0.2)
        with running_worker(config) as running, StreamClient.connect(running.ws_url) as client:
            client.send_hello(new_ticket())
            with pytest.raises(ConnectionClosed):
                client.receive_until(lambda message: isinstance(message, Ready), timeout=5)
            assert client.close_code == CloseCode.BAD_TICKET
            time.sleep(0.5)
            # A refusal (401) is not retried: the secret will not fix itself. No session, so no report.
            assert receiver.attempts == 0
    assert receiver.claims == []
    assert receiver.refused == ["stream claim signature is invalid"]


def test_without_a_report_url_nothing_is_reported() -> None:
    with running_worker() as running:
        assert running.worker.reporter is None


def test_a_paused_stream_keeps_reporting_its_unchanged_total_as_a_heartbeat() -> None:
    receiver = Receiver()
    receiver.up.set()
    clock = FakeClock()
    with usage_receiver(receiver) as url:
        config = worker_config(usage_report_url=url, usage_report_interval_seconds=0.1)
        with running_worker(config, clock=clock) as running, StreamClient.connect(running.ws_url) as client:
            client.start(new_ticket())
            _stream_seconds(client, clock, 2)
            wait_for(lambda: any(r.seconds == 2 for r in receiver.accepted()), timeout=5)
            # The tab stops sending frames but keeps its socket: the app still hears from the stream,
            # with the same total, so it can tell a paused stream from a dead worker.
            heard = len(receiver.accepted())
            wait_for(lambda: len(receiver.accepted()) >= heard + 2, timeout=5)
            assert {r.seconds for r in receiver.accepted()[heard:]} == {2}
            assert not any(r.final for r in receiver.accepted())
