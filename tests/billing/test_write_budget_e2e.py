"""The app's own budget of Clerk metadata writes per user, end to end: the whole app on a real socket, the
real Clerk SDK, and the sandbox Clerk emulator, which (like Clerk) refuses an 11th metadata write for a user
within 10 seconds with 429.

A user starting and ending streams as fast as the app answers, with a burst of usage reports for each
stream, needs a write for every reservation and every final report. The app spaces them a second apart
and, within any 10 seconds, makes at most 8, leaving Clerk's last 2 for ChargeBee's webhooks. So even with
two webhooks landing in the middle of the burst nothing is refused, and every second streamed is counted.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.wiring import plan_catalogue
from tests.stack import Browser, Stack, running_stack, usage

APP_WRITES_PER_WINDOW = 8  # the app's own budget (docs/metering.md, "Batching")
CLERK_WRITES_PER_WINDOW = 10
WINDOW_SECONDS = 10.0
# Write times are sampled by polling the emulator's counter, so they are late by up to a poll: a window a
# little shorter than 10 s never counts one write too many for that.
MEASURED_WINDOW = WINDOW_SECONDS - 0.3
ONLY_THE_APP_SECONDS = 11.0
WITH_WEBHOOKS_SECONDS = 3.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as running:
        yield running


class WriteLog:
    """When the emulator counted each metadata write for one user (monotonic seconds), by polling it."""

    def __init__(self, stack: Stack, user_id: str) -> None:
        self.times: list[float] = []
        self._stack, self._user_id = stack, user_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> WriteLog:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        seen = self._stack.emulator.metadata_write_count(self._user_id)
        while not self._stop.is_set():
            count = self._stack.emulator.metadata_write_count(self._user_id)
            now = time.monotonic()
            self.times.extend([now] * (count - seen))
            seen = count
            time.sleep(0.005)

    def most_in_a_window(self, since: float, until: float) -> int:
        inside = [at for at in self.times if since <= at <= until]
        return max(
            (sum(1 for later in inside if first <= later < first + MEASURED_WINDOW) for first in inside),
            default=0,
        )


def subscription_event(event_id: str, event_type: str, user_id: str, item_price: str, version: int) -> bytes:
    now = int(time.time())
    subscription = {
        "id": "sub_budget",
        "customer_id": user_id,
        "status": "active",
        "created_at": now - 60,
        "current_term_start": now - 60,
        "current_term_end": now + 30 * 86_400,
        "resource_version": version,
        "due_invoices_count": 0,
        "subscription_items": [{"item_price_id": item_price, "item_type": "plan", "quantity": 1}],
    }
    return json.dumps(
        {
            "id": event_id,
            "occurred_at": now,
            "object": "event",
            "api_version": "v2",
            "event_type": event_type,
            "content": {"subscription": subscription, "customer": {"id": user_id}},
        }
    ).encode()


def post_webhook(stack: Stack, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/api/webhooks/chargebee",
        content=body,
        auth=(stack.settings.chargebee_webhook_username, stack.settings.chargebee_webhook_password),
        headers={"content-type": "application/json"},
        timeout=30,
    )


def stream_once(stack: Stack, browser: Browser, pool: ThreadPoolExecutor) -> list[httpx.Response]:
    """A ticket and the worker's claim of its stream, a burst of running reports for it (as from several
    workers' retries), and the final report: one second streamed."""
    ticket = browser.ticket()
    answers = [ticket]
    if ticket.status_code != 200:
        return answers
    stream_id = ticket.json()["stream_id"]
    answers.append(stack.claim(browser, stream_id))
    burst: list[Callable[[], httpx.Response]] = [lambda: stack.report(usage(browser, stream_id, 1))] * 6
    answers += list(pool.map(lambda call: call(), burst))
    answers.append(stack.report(usage(browser, stream_id, 1, final=True)))
    return answers


def test_a_burst_of_streams_reports_and_webhooks_stays_within_clerks_write_limit(stack: Stack) -> None:
    browser = stack.sign_in("burst@example.com")
    pro, ultra = (plan.item_price_id or "" for plan in plan_catalogue(stack.settings).paid)
    version = int(time.time()) * 1000
    webhooks = [
        subscription_event("ev_budget_1", "subscription_created", browser.user_id, pro, version),
        subscription_event("ev_budget_2", "subscription_changed", browser.user_id, ultra, version + 1),
    ]
    answers: list[httpx.Response] = []
    webhook_answers: list[httpx.Response] = []
    streams = 0

    with WriteLog(stack, browser.user_id) as writes, ThreadPoolExecutor(max_workers=6) as pool:
        started = time.monotonic()
        while time.monotonic() - started < ONLY_THE_APP_SECONDS:
            answers += stream_once(stack, browser, pool)
            streams += 1
        only_the_app = time.monotonic()
        # ChargeBee's events arrive in the middle of it: the writes Clerk has left must be there for them.
        arriving = [pool.submit(post_webhook, stack, body) for body in webhooks]
        while time.monotonic() - only_the_app < WITH_WEBHOOKS_SECONDS:
            answers += stream_once(stack, browser, pool)
            streams += 1
        webhook_answers = [future.result() for future in arriving]
        finished = time.monotonic()

    # Clerk refused nothing: a 429 would have reached the caller as a 503 (or a 500).
    assert [answer.status_code for answer in answers] == [200] * len(answers), [
        (answer.request.url.path, answer.status_code, answer.text)
        for answer in answers
        if answer.status_code != 200
    ]
    assert [answer.status_code for answer in webhook_answers] == [200, 200], [a.text for a in webhook_answers]
    # Every stream's second was counted, once, and the webhooks' plan landed.
    stored = stack.metadata(browser.user_id)
    assert stored.public.free_seconds_used + stored.public.seconds_used == streams
    assert stored.public.plan == "ultra"
    # A write for every claim (carrying its ticket's reservation) and final report, a second apart: the
    # budget, not the traffic, set the pace, and the app kept to its 8 in any 10 s, leaving room for the
    # webhooks' 2.
    assert streams >= 4
    assert len([at for at in writes.times if at <= only_the_app]) > APP_WRITES_PER_WINDOW, writes.times
    assert writes.most_in_a_window(started, only_the_app) <= APP_WRITES_PER_WINDOW, writes.times
    assert writes.most_in_a_window(started, finished) <= CLERK_WRITES_PER_WINDOW, writes.times


def test_the_write_log_sees_each_write_when_it_happens(stack: Stack) -> None:
    """The measuring instrument itself: writes a known distance apart are seen that far apart."""
    browser = stack.sign_in("instrument@example.com")
    with WriteLog(stack, browser.user_id) as writes:
        first = browser.ticket()
        assert first.status_code == 200
        stream_id: Any = first.json()["stream_id"]
        assert stack.claim(browser, stream_id).status_code == 200
        time.sleep(1.5)
        assert stack.report(usage(browser, stream_id, 1, final=True)).status_code == 200
        time.sleep(0.1)
    assert len(writes.times) == 2, writes.times
    assert 1.4 <= writes.times[1] - writes.times[0] <= 2.5, writes.times
    assert writes.most_in_a_window(writes.times[0], writes.times[1]) == 2
