"""Metering through the running app: tickets, signed usage reports and the usage meter, with the real
Clerk SDK talking to the sandbox Clerk emulator over a real socket."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.auth import SESSION_COOKIE
from app.settings import load_settings
from billing.accounts import AccountStore
from billing.ledger_store import LedgerStore
from billing.metadata import BillingMetadata, PublicBilling
from billing.plans import PRO_SECONDS_PER_PERIOD, PlanId
from billing.statuses import SubscriptionStatus
from inference.protocol import UsageReport
from inference.tickets import verify_ticket
from inference.usage_reporter import SIGNATURE_HEADER, encode_usage_report
from tests.inference.helpers import StreamClient, webcam_jpeg
from tests.stack import Browser, Stack, running_stack, stack_behind_flaky_clerk, usage

FREE_SECONDS = 60


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as running:
        yield running


def pro(seconds_used: int = 0) -> BillingMetadata:
    now = int(time.time())
    return BillingMetadata(
        public=PublicBilling(
            plan=PlanId.PRO,
            status=SubscriptionStatus.ACTIVE,
            seconds_used=seconds_used,
            period_start=now - 86_400,
            period_end=now + 29 * 86_400,
        )
    )


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def in_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def granted_stream(browser: Browser, settings_secret: str) -> tuple[str, int]:
    answer = browser.ticket()
    assert answer.status_code == 200, answer.text
    ticket = verify_ticket(settings_secret, answer.json()["ticket"])
    assert ticket.user_id == browser.user_id
    assert ticket.stream_id == answer.json()["stream_id"]
    return ticket.stream_id, ticket.allowance_seconds


# ---- who may report usage ----------------------------------------------------------------------------------


def test_only_the_worker_can_report_usage(stack: Stack) -> None:
    browser = stack.sign_in("mallory@example.com")
    stream_id, _ = granted_stream(browser, stack.settings.stream_secret)
    claim = usage(browser, stream_id, 45)
    body = msgspec.json.encode(claim)

    unsigned = httpx.post(f"{stack.url}/api/usage/report", content=body, timeout=10)
    forged_body, forged_headers = encode_usage_report("not-the-stream-secret-" + "x" * 32, claim)
    forged = httpx.post(
        f"{stack.url}/api/usage/report", content=forged_body, headers=forged_headers, timeout=10
    )
    _, genuine_headers = encode_usage_report(stack.settings.stream_secret, usage(browser, stream_id, 1))
    tampered = httpx.post(f"{stack.url}/api/usage/report", content=body, headers=genuine_headers, timeout=10)
    # The user's own signed-in session, CSRF token and all, is no credential for this endpoint.
    with_cookie = browser.client.post(
        "/api/usage/report",
        content=body,
        headers={"x-csrftoken": browser.csrf_token, "content-type": "application/json"},
    )
    for answer in (unsigned, forged, tampered, with_cookie):
        assert answer.status_code == 401
        assert answer.json()["error"] == "unauthenticated"
    assert stack.metadata(browser.user_id).public.free_seconds_used == 0

    genuine = stack.report(usage(browser, stream_id, 12))
    assert genuine.status_code == 200, genuine.text
    assert genuine.json()["added_seconds"] == 12
    wait_until(lambda: stack.metadata(browser.user_id).public.free_seconds_used == 12)


def test_a_stale_signature_is_refused(stack: Stack) -> None:
    browser = stack.sign_in("replay@example.com")
    stream_id, _ = granted_stream(browser, stack.settings.stream_secret)
    body, headers = encode_usage_report(
        stack.settings.stream_secret, usage(browser, stream_id, 9), now=time.time() - 3600
    )
    answer = httpx.post(f"{stack.url}/api/usage/report", content=body, headers=headers, timeout=10)
    assert answer.status_code == 401
    assert SIGNATURE_HEADER in headers
    assert stack.metadata(browser.user_id).public.free_seconds_used == 0


# ---- counting ----------------------------------------------------------------------------------------------


def test_duplicated_and_reordered_reports_count_once_in_few_clerk_writes(stack: Stack) -> None:
    browser = stack.sign_in("pro@example.com")
    stack.set_metadata(browser.user_id, pro())
    stream_id, allowance = granted_stream(browser, stack.settings.stream_secret)
    assert allowance == PRO_SECONDS_PER_PERIOD

    stack.emulator.reset_counters()
    # A worker's reports for 5..60 s, each sent three times, all at once and in scrambled order.
    reports = [usage(browser, stream_id, seconds) for seconds in range(5, 65, 5)] * 3
    reports = reports[::2] + reports[1::2][::-1]
    answers = in_parallel([lambda r=r: stack.report(r) for r in reports])
    assert [answer.status_code for answer in answers] == [200] * len(reports)
    wait_until(lambda: stack.metadata(browser.user_id).public.seconds_used == 60)
    # 36 reports arriving together became a handful of writes, far inside Clerk's 10 per 10 s.
    assert 1 <= stack.emulator.metadata_write_count(browser.user_id) <= 4

    final = stack.report(usage(browser, stream_id, 63, final=True))
    assert final.json() == {"stream_id": stream_id, "added_seconds": 3, "stream_seconds": 63, "durable": True}
    late = stack.report(usage(browser, stream_id, 40))
    assert late.status_code == 200
    assert late.json()["added_seconds"] == 0  # a late, smaller report never lowers the total
    stored = stack.metadata(browser.user_id)
    assert stored.public.seconds_used == 63
    assert stored.private.streams[stream_id].final

    # The finished stream no longer holds anything: the next tab gets everything that is left.
    _, next_allowance = granted_stream(browser, stack.settings.stream_secret)
    assert next_allowance == PRO_SECONDS_PER_PERIOD - 63


def test_a_steady_stream_of_reports_stays_within_clerks_write_limit(stack: Stack) -> None:
    browser = stack.sign_in("steady@example.com")
    stack.set_metadata(browser.user_id, pro())
    stream_id, _ = granted_stream(browser, stack.settings.stream_secret)
    stack.emulator.reset_counters()
    started = time.monotonic()
    seconds = 0
    # Five reports a second for 4 s (as if twenty streams reported at once): every one must succeed.
    while time.monotonic() - started < 4:
        seconds += 1
        answers = in_parallel([lambda s=seconds: stack.report(usage(browser, stream_id, s))] * 5)
        assert {answer.status_code for answer in answers} == {200}
        time.sleep(0.2)
    wait_until(lambda: stack.metadata(browser.user_id).public.seconds_used == seconds)
    writes = stack.emulator.metadata_write_count(browser.user_id)
    assert writes <= 6  # at most one per second


def test_reports_for_streams_not_issued_to_the_user_are_refused(stack: Stack) -> None:
    alice = stack.sign_in("alice@example.com")
    bob = stack.sign_in("bob@example.com")
    alices_stream, _ = granted_stream(alice, stack.settings.stream_secret)
    refusals = {
        "stream_made_up": "malformed_stream_id",
        f"st_{int(time.time())}_0123456789ab": "unknown_stream",
        f"st_{int(time.time()) - 86_400}_0123456789ab": "stream_expired",
        # Alice's stream billed to Bob: the ticket was not his.
        alices_stream: "unknown_stream",
    }
    for stream_id, error in refusals.items():
        answer = stack.report(usage(bob, stream_id, 30))
        assert answer.status_code == 409  # a 4xx the worker does not retry
        assert answer.json()["error"] == error
    assert stack.metadata(bob.user_id).public.free_seconds_used == 0
    assert stack.metadata(alice.user_id).public.free_seconds_used == 0


# ---- tickets -----------------------------------------------------------------------------------------------


def test_a_ticket_names_the_worker_and_needs_the_csrf_token(stack: Stack) -> None:
    browser = stack.sign_in("ticket@example.com")
    refused = browser.client.post("/api/stream/ticket")
    assert refused.status_code == 403
    answer = browser.ticket()
    assert answer.status_code == 200
    assert answer.json()["url"] == f"ws://127.0.0.1:{stack.settings.port}/ws"
    assert answer.json()["allowance_seconds"] == FREE_SECONDS
    anonymous = httpx.post(f"{stack.url}/api/stream/ticket", timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "unauthenticated"


def test_the_worker_url_is_the_configured_one_or_the_apps_own(tmp_path: Path) -> None:
    remote = load_settings({"INFERENCE_URL": "wss://gpu.example.com/ws"}, state_dir=tmp_path, dotenv=None)
    assert remote.worker_url == "wss://gpu.example.com/ws"
    public = load_settings(
        {"APP_URL": "https://stylecast.example.com", "STYLECAST_MODE": "sandbox"},
        state_dir=tmp_path,
        dotenv=None,
    )
    assert public.worker_url == "wss://stylecast.example.com/ws"


def test_two_tabs_never_get_more_than_the_account_has(stack: Stack) -> None:
    browser = stack.sign_in("two-tabs@example.com")
    answers = in_parallel([browser.ticket] * 6)
    granted = [answer for answer in answers if answer.status_code == 200]
    assert len(granted) == 1
    assert sorted(answer.status_code for answer in answers) == [200] + [409] * 5
    assert {answer.json()["error"] for answer in answers if answer.status_code == 409} == {"minutes_in_use"}
    first = verify_ticket(stack.settings.stream_secret, granted[0].json()["ticket"])
    assert first.allowance_seconds == FREE_SECONDS

    # The first tab streams 25 s and ends: two tabs asking now share the 35 s left, never more.
    assert stack.report(usage(browser, first.stream_id, 25, final=True)).status_code == 200
    answers = in_parallel([browser.ticket] * 2)
    allowances = [
        verify_ticket(stack.settings.stream_secret, answer.json()["ticket"]).allowance_seconds
        for answer in answers
        if answer.status_code == 200
    ]
    assert allowances == [FREE_SECONDS - 25]

    # That one uses it all: the account is out of minutes, and the meter stops polling.
    second = verify_ticket(
        stack.settings.stream_secret, next(a for a in answers if a.status_code == 200).json()["ticket"]
    )
    assert stack.report(usage(browser, second.stream_id, 35, final=True)).status_code == 200
    out = browser.ticket()
    assert out.status_code == 402
    assert out.json()["error"] == "out_of_minutes"
    meter = browser.meter()
    assert meter.status_code == 286
    assert 'data-testid="usage-exhausted"' in meter.text
    assert stack.metadata(browser.user_id).public.free_seconds_used == FREE_SECONDS


# ---- tickets: decided at once, written with their claim ----------------------------------------------------


def test_a_ticket_costs_no_clerk_write_and_its_claim_writes_it(stack: Stack) -> None:
    browser = stack.sign_in("first-frame@example.com")
    browser.meter()  # the studio page has read the account
    stack.emulator.reset_counters()
    stream_id, allowance = granted_stream(browser, stack.settings.stream_secret)
    assert allowance == FREE_SECONDS
    assert stack.emulator.metadata_write_count(browser.user_id) == 0
    assert stream_id not in stack.metadata(browser.user_id).private.streams

    claimed = stack.claim(browser, stream_id)
    assert claimed.status_code == 200, claimed.text
    # One write carries the reservation and the claim, and the claim was not held back behind a ticket's.
    assert stack.emulator.metadata_write_count(browser.user_id) == 1
    entry = stack.metadata(browser.user_id).private.streams[stream_id]
    assert entry.claimed
    assert entry.allowance == FREE_SECONDS
    assert stack.claim(browser, stream_id).json()["error"] == "already_claimed"


def test_a_second_tab_asking_while_the_first_claim_is_written_gets_only_what_is_left(tmp_path: Path) -> None:
    with stack_behind_flaky_clerk(tmp_path) as (stack, proxy):
        browser = stack.sign_in("slow-clerk@example.com")
        stream_id, _ = granted_stream(browser, stack.settings.stream_secret)
        proxy.write_delay = 1.5
        with ThreadPoolExecutor(max_workers=1) as pool:
            claiming = pool.submit(stack.claim, browser, stream_id)
            time.sleep(0.5)  # the claim's write, carrying the reservation, is on its way to Clerk
            second = browser.ticket()
            assert claiming.result().status_code == 200
        assert second.status_code == 409, second.text
        assert second.json()["error"] == "minutes_in_use"
        proxy.write_delay = 0.0
        # Once the first stream ends, the second tab gets what it left.
        assert stack.report(usage(browser, stream_id, 20, final=True)).status_code == 200
        assert granted_stream(browser, stack.settings.stream_secret)[1] == FREE_SECONDS - 20


def test_a_ticket_not_yet_written_when_the_app_restarts_cannot_be_claimed(stack: Stack) -> None:
    browser = stack.sign_in("restart@example.com")
    old_stream, _ = granted_stream(browser, stack.settings.stream_secret)
    # A new process: nothing of the old one's memory, Clerk as the old one left it.
    accounts = AccountStore(stack.app.state.clerk)
    stack.app.state.accounts = accounts
    stack.app.state.ledger = LedgerStore(accounts, stack.app.state.catalogue)

    refused = stack.claim(browser, old_stream)
    assert refused.status_code == 409
    assert refused.json()["error"] == "unknown_stream"
    assert stack.report(usage(browser, old_stream, 30, final=True)).status_code == 409
    # The studio's next ticket gets the whole minute, and only that stream is billed.
    new_stream, allowance = granted_stream(browser, stack.settings.stream_secret)
    assert allowance == FREE_SECONDS
    assert stack.claim(browser, new_stream).status_code == 200
    assert stack.report(usage(browser, new_stream, 40, final=True)).status_code == 200
    assert stack.metadata(browser.user_id).public.free_seconds_used == 40


# ---- the meter ---------------------------------------------------------------------------------------------


def test_meter_polling_is_served_from_the_cache(stack: Stack) -> None:
    browser = stack.sign_in("poller@example.com")
    stack.set_metadata(browser.user_id, pro(seconds_used=10 * 60 + 15))
    stack.emulator.reset_counters()

    def poll() -> httpx.Response:
        with httpx.Client(base_url=stack.url, cookies={SESSION_COOKIE: browser.session_token}) as client:
            return client.get("/partials/usage-meter", headers={"HX-Request": "true"})

    # Fifty tabs polling at once with nothing cached: Clerk is asked once.
    answers = in_parallel([poll] * 50)
    assert stack.emulator.request_count == 1
    # Fifty more: Clerk is not asked at all.
    stack.emulator.reset_counters()
    answers += in_parallel([poll] * 50)
    assert stack.emulator.request_count == 0
    for answer in answers:
        assert answer.status_code == 200
        assert 'data-testid="usage-plan">Pro<' in answer.text
        assert 'data-testid="usage-time-left">19:45<' in answer.text
        assert 'aria-valuenow="34"' in answer.text


def test_the_meter_follows_reports_without_asking_clerk(stack: Stack) -> None:
    browser = stack.sign_in("follower@example.com")
    stream_id, _ = granted_stream(browser, stack.settings.stream_secret)
    assert 'data-testid="usage-time-left">1:00<' in browser.meter().text
    assert stack.report(usage(browser, stream_id, 18)).status_code == 200
    stack.emulator.reset_counters()
    meter = browser.meter()
    assert 'data-testid="usage-plan">Free<' in meter.text
    assert 'data-testid="usage-time-left">0:42<' in meter.text
    assert stack.emulator.request_count == 0  # the report's write refreshed the cached view


def test_the_meter_needs_a_session(stack: Stack) -> None:
    answer = httpx.get(f"{stack.url}/partials/usage-meter", headers={"HX-Request": "true"}, timeout=10)
    assert answer.status_code == 401
    assert "HX-Redirect" not in answer.headers  # a poll never navigates away; the page refreshes its token


# ---- Clerk failing -----------------------------------------------------------------------------------------


def test_a_clerk_outage_is_retried_by_the_worker_and_never_double_counted(tmp_path: Path) -> None:
    with stack_behind_flaky_clerk(tmp_path) as (stack, clerk):
        browser = stack.sign_in("outage@example.com")
        stream_id, _ = granted_stream(browser, stack.settings.stream_secret)
        assert stack.report(usage(browser, stream_id, 10)).status_code == 200
        wait_until(lambda: stack.metadata(browser.user_id).public.free_seconds_used == 10)

        clerk.mode = "down"
        # A running stream's report is taken (the stream goes on); its write waits for Clerk.
        running = stack.report(usage(browser, stream_id, 20))
        assert running.status_code == 200
        assert running.json()["durable"] is False
        time.sleep(1.5)  # past the write's due time: it failed, and the report is kept for the next one
        assert stack.metadata(browser.user_id).public.free_seconds_used == 10
        assert browser.ticket().status_code == 503
        # What must be durable is refused while Clerk is down, so the worker retries it.
        down = stack.report(usage(browser, stream_id, 20, final=True))
        assert down.status_code == 503
        assert down.headers["Retry-After"]

        # Clerk stores the write but the answer is lost: the app cannot know it landed.
        clerk.mode = "lost_answer"
        assert stack.report(usage(browser, stream_id, 20, final=True)).status_code == 503
        assert stack.metadata(browser.user_id).public.free_seconds_used == 20

        clerk.mode = "up"
        retried = stack.report(usage(browser, stream_id, 20, final=True))
        assert retried.status_code == 200
        assert retried.json()["added_seconds"] == 0
        assert retried.json()["durable"] is True
        assert stack.metadata(browser.user_id).public.free_seconds_used == 20


# ---- end to end --------------------------------------------------------------------------------------------


def test_a_real_stream_is_billed_what_the_worker_delivered(stack: Stack) -> None:
    """The studio's path: ticket, WebSocket to the in-process worker, styled frames for a few seconds,
    close; the worker's own reports land in Clerk through the report endpoint."""
    browser = stack.sign_in("streamer@example.com")
    answer = browser.ticket()
    assert answer.status_code == 200
    ticket = answer.json()
    frame = webcam_jpeg()
    with StreamClient.connect(ticket["url"]) as client:
        client.start(ticket["ticket"], timeout=30)
        started = time.monotonic()
        frame_id = 0
        while time.monotonic() - started < 3.5:
            frame_id += 1
            client.send_frame(frame_id, frame)
            client.frame(frame_id, timeout=10)
    stream_id = ticket["stream_id"]

    def closed() -> bool:
        entry = stack.metadata(browser.user_id).private.streams.get(stream_id)
        return entry is not None and entry.final

    wait_until(closed, timeout=20, what="the worker's final report")
    stored = stack.metadata(browser.user_id)
    billed = stored.public.free_seconds_used
    # Frames flowed in 4 or 5 distinct wall-clock seconds; each is billed once, nothing else is.
    assert 3 <= billed <= 5
    assert stored.private.streams[stream_id].seconds == billed
    _, allowance = granted_stream(browser, stack.settings.stream_secret)
    assert allowance == FREE_SECONDS - billed


def test_unknown_user_reports_are_refused_not_retried(stack: Stack) -> None:
    report = UsageReport(
        stream_id=f"st_{int(time.time())}_0123456789ab",
        user_id="user_doesnotexist",
        worker_id="test-gpu",
        seconds=5,
        final=False,
        sent_at=0.0,
    )
    answer = stack.report(report)
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_user"


# ---- the Clerk budget --------------------------------------------------------------------------------------


def test_running_streams_cost_clerk_one_write_per_write_interval_and_no_reads(tmp_path: Path) -> None:
    """docs/metering.md's budget, measured on the emulator: a running stream's reports every second and its
    viewer's meter polls every half second cost one metadata write per `deferred_write_seconds` and no read,
    so one Clerk instance carries thousands of streams."""
    with running_stack(tmp_path) as stack:
        interval = 2.0
        stack.app.state.ledger = LedgerStore(
            stack.app.state.accounts, stack.app.state.catalogue, deferred_write_seconds=interval
        )
        browsers = [stack.sign_in(f"viewer{index}@example.com") for index in range(6)]
        streams = [granted_stream(browser, stack.settings.stream_secret)[0] for browser in browsers]
        stack.emulator.reset_counters()
        started = time.monotonic()
        seconds = 0
        while time.monotonic() - started < 3 * interval:
            seconds += 1
            in_parallel(
                [
                    lambda b=b, s=s, n=seconds: stack.report(usage(b, s, n))
                    for b, s in zip(browsers, streams, strict=True)
                ]
                + [lambda b=b: b.meter() for b in browsers] * 2
            )
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        requests = stack.emulator.request_count
        # One write per user per interval (3 intervals, plus one that may straddle the end), no reads.
        assert requests <= len(browsers) * (elapsed / interval + 1), requests
        for browser in browsers:
            assert stack.emulator.metadata_write_count(browser.user_id) <= elapsed / interval + 1
        # Nothing was lost: every stream's total reaches Clerk.
        for browser, stream_id in zip(browsers, streams, strict=True):
            wait_until(
                lambda b=browser, s=stream_id: stack.metadata(b.user_id).private.streams[s].seconds == seconds
            )


def test_the_meter_shows_a_running_streams_seconds_before_they_are_written(tmp_path: Path) -> None:
    with running_stack(tmp_path) as stack:
        stack.app.state.ledger = LedgerStore(
            stack.app.state.accounts, stack.app.state.catalogue, deferred_write_seconds=30
        )
        browser = stack.sign_in("meter@example.com")
        stream_id, _ = granted_stream(browser, stack.settings.stream_secret)
        before = _seconds_left(browser.meter().text)
        assert stack.report(usage(browser, stream_id, 25)).json()["durable"] is False
        assert _seconds_left(browser.meter().text) == before - 25
        assert stack.metadata(browser.user_id).public.free_seconds_used == 0  # not written yet


def _seconds_left(meter_html: str) -> int:
    return int(meter_html.split('data-seconds-left="', 1)[1].split('"', 1)[0])
