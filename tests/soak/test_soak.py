"""Soak: many users, many tabs, two workers, one crash, plans bought and cancelled, all at once, in CI.

The app (`python -m app`, sandbox) and two preview workers (`python -m inference`, a render delay per frame)
on loopback; 60 simulated studio tabs of 60 users stream at once (a user's live stream holds all their time,
so a second tab of theirs waits with 409 rather than streams: 50 concurrent streams take 50 users), reconnect
at random, duplicate themselves onto the other worker with the same ticket (at once, and a few seconds into
the stream), replay spent tickets; one worker is SIGKILLed mid-stream and started again; users buy Pro
through the sandbox checkout, switch to Ultra and cancel in the portal while they stream (the ChargeBee
emulator sends the real webhooks). The Free plan is 10 s here, so users run out and are closed with 4402.
Then, from what Clerk holds once every report is in, for every user:

* billed seconds = delivered seconds (what the worker counts, bracketed from the client's own timings and
  each frame's header, tests/soak/accounting.py) on every stream that ended; on a stream the crash cut
  off, at most one report interval (and the second in progress) less; never more than delivered;
* never more than allowed: each stream within its ticket, the Free plan within FREE_PLAN_SECONDS, usage
  counted once into the counters, an exhausted account exactly at its limit;
* no ticket served twice: on every ticket presented to two workers or presented again, styled frames came
  from one connection at most, and the others were refused with 4401;
* no emulator answered 429 (uvicorn's access log of the app records every emulator request it served).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clerk_backend_api import Clerk
from hypothesis import given
from hypothesis import strategies as st

from app.settings import Settings, load_settings
from app.wiring import plan_catalogue
from billing.metadata import BillingMetadata, decode_metadata
from billing.plans import PlanId
from inference.protocol import CloseCode
from tests.conftest import AppProcess
from tests.inference.helpers import webcam_jpeg
from tests.live_server import free_port
from tests.soak.accounting import delivered_bounds, received_seconds
from tests.soak.harness import (
    SimUser,
    Soak,
    SoakPlan,
    SocketRecord,
    TicketRecord,
    WorkerProcess,
    emulator_statuses,
    run_in_thread,
)

PLAN = SoakPlan(
    users=60,
    soak_seconds=60,
    free_seconds=10,
    report_interval_seconds=1.0,
    preview_delay_ms=60,
    # At 60-100 ms a frame a worker takes 50-80 sessions before they would drop below this, so admission
    # turns sessions away (4503) only when one worker carries nearly everyone, as during the crash.
    min_session_fps=0.2,
    kill_after_seconds=15,
    down_seconds=2,
    stream_seconds=(3.0, 10.0),
    duplicate_share=0.25,
    late_duplicate_share=0.25,
    replay_share=0.2,
    upgrades=30,
    cancels=6,
    switches=4,
    seed=14,
)
# A running stream's reports reach Clerk within this (billing/ledger_store.py's deferred_write_seconds, which
# `python -m app` does not change), so a crashed stream's last total is in Clerk by then.
DEFERRED_WRITE_SECONDS = 20
# What a crash may cost a stream: the report interval, plus the second that was in progress when the last
# report read the total (a second is billed when its first frame goes out, so a report just before a new
# second misses it, and the next second can begin before the next report).
CRASH_LOSS_SECONDS = math.ceil(PLAN.report_interval_seconds) + 1


@pytest.mark.timeout(240)
def test_many_users_many_workers_a_crash_and_plan_changes_bill_exactly_what_was_delivered(
    start_app: Callable[..., AppProcess], tmp_path: Path
) -> None:
    began = time.monotonic()
    port_a, port_b = free_port(), free_port()
    app = start_app(
        INFERENCE_URL=f"ws://127.0.0.1:{port_a}/ws",
        FREE_PLAN_SECONDS=str(PLAN.free_seconds),
        LOG_LEVEL="INFO",
    )
    settings = load_settings(
        {"FREE_PLAN_SECONDS": str(PLAN.free_seconds)}, state_dir=app.state_dir, dotenv=None
    )
    environment = {
        "STREAM_SECRET": settings.stream_secret,
        "USAGE_REPORT_URL": f"{app.url}/api/usage/report",
        "USAGE_REPORT_INTERVAL_SECONDS": str(PLAN.report_interval_seconds),
        "PREVIEW_DELAY_MS": str(PLAN.preview_delay_ms),
        "MIN_SESSION_FPS": str(PLAN.min_session_fps),
    }
    workers = [
        WorkerProcess(name, port, environment, tmp_path, tmp_path)
        for name, port in (("a", port_a), ("b", port_b))
    ]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda worker: worker.start(), workers))
        soak = Soak(PLAN, app.url, workers, webcam_jpeg(160, 120))
        run_in_thread(lambda: soak.run(settings.chargebee_item_price_ultra, victim=workers[1]))
        clerk = app.clerk()
        stored = wait_until_reported(soak, clerk)
        report = Verdict(soak, stored, settings)
        report.check()
    finally:
        for worker in workers:
            worker.stop()
    report.check_logs(app.log(), "\n".join(worker.log() for worker in workers))
    print(report.summary(time.monotonic() - began))
    assert report.failures == [], "\n".join(report.failures[:40]) + "\n" + report.summary()


def wait_until_reported(soak: Soak, clerk: Clerk) -> dict[str, BillingMetadata]:
    """Clerk's metadata of every user once every stream that ended has its final report in, and the
    crashed streams' last running reports have been written (within DEFERRED_WRITE_SECONDS)."""
    if soak.kill_at is not None:
        time.sleep(max(0.0, soak.kill_at + DEFERRED_WRITE_SECONDS + 2 - time.time()))
    deadline = time.monotonic() + 45
    while True:
        stored = {user.user_id: read_metadata(clerk, user.user_id) for user in soak.users}
        pending = [
            (user.email, ticket.stream_id)
            for user in soak.users
            for ticket in user.tickets
            for socket in ticket.served
            if socket.worker != soak.killed
            and (entry := stored[user.user_id].private.streams.get(ticket.stream_id)) is not None
            and not entry.final
        ]
        if not pending or time.monotonic() > deadline:
            return stored
        time.sleep(1.0)


def read_metadata(clerk: Clerk, user_id: str) -> BillingMetadata:
    user = clerk.users.get(user_id=user_id)
    return decode_metadata(user.public_metadata, user.private_metadata)


class Verdict:
    """Every invariant, checked for every user and every ticket; failures are collected, not raised, so a
    broken run shows all that broke."""

    def __init__(self, soak: Soak, stored: dict[str, BillingMetadata], settings: Settings) -> None:
        self.soak = soak
        self.stored = stored
        self.catalogue = plan_catalogue(settings)
        self.free = settings.free_plan_seconds
        self.failures: list[str] = []
        self.stats: Counter[str] = Counter()
        self.losses: list[int] = []
        self.emulator_requests: Counter[tuple[str, int]] = Counter()

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def check(self) -> None:
        soak = self.soak
        for user in soak.users:
            self.check_user(user)
        self.check_coverage()
        if soak.billing_errors:
            self.fail(f"billing actions failed: {soak.billing_errors}")

    # ---- per user ----

    def check_user(self, user: SimUser) -> None:
        metadata = self.stored[user.user_id]
        ledger = metadata.private.streams
        name = user.email
        if metadata.private.streams_pruned_before:
            self.fail(f"{name}: the ledger pruned streams, the soak cannot check them all")
        issued = {ticket.stream_id for ticket in user.tickets}
        self.stats["most_tickets_per_user"] = max(self.stats["most_tickets_per_user"], len(issued))
        if not set(ledger) <= issued:
            self.fail(f"{name}: ledger streams {sorted(set(ledger) - issued)} were never issued to the user")
        billed_total = lowest = highest = crashes = 0
        for ticket in user.tickets:
            entry = ledger.get(ticket.stream_id)
            if entry is None:
                # A ticket that was never presented holds nothing once it expires, so its reservation is
                # dropped if the user's next write comes after that (billing/ledger_store.py). One that
                # was presented was claimed, and a claim is written before the stream starts.
                if ticket.served:
                    self.fail(f"{name} {ticket.stream_id}: streamed, but the ledger has no entry for it")
                else:
                    self.stats["unpresented_tickets_left_out"] += 1
                continue
            self.check_single_service(name, ticket)
            billed = entry.seconds
            billed_total += billed
            if entry.allowance != ticket.allowance or billed > entry.allowance:
                self.fail(f"{name} {ticket.stream_id}: billed {billed} of allowance {entry.allowance}")
            served = ticket.served
            if not served:
                if billed:
                    self.fail(
                        f"{name} {ticket.stream_id}: {billed} s billed for a ticket nothing streamed on"
                    )
                continue
            if not entry.claimed:
                self.fail(f"{name} {ticket.stream_id}: streamed, but the ledger holds no claim for it")
            stream = served[0]
            fewest, most = delivered_bounds(stream.frames)
            self.stats["streams"] += 1
            self.stats["seconds_received"] += received_seconds(stream.frames)
            self.stats["ambiguous"] += most - fewest
            if stream.close_code == CloseCode.ALLOWANCE_USED:
                self.stats["closed_4402"] += 1
            crashed = self.crashed(stream, entry.final)
            if crashed is None:
                self.fail(
                    f"{name} {ticket.stream_id}: ended on {stream.worker} ({stream.close_code}) "
                    f"but its final report never arrived"
                )
                continue
            lowest += fewest
            highest += most
            if billed > most:
                self.fail(f"{name} {ticket.stream_id}: billed {billed} s, delivered at most {most}")
            if crashed:
                crashes += 1
                self.stats["crashed_streams"] += 1
                self.losses.append(max(0, fewest - billed))
                if billed < fewest - CRASH_LOSS_SECONDS:
                    self.fail(
                        f"{name} {ticket.stream_id}: crash cost {fewest - billed} s (> {CRASH_LOSS_SECONDS})"
                    )
            else:
                if billed < fewest:
                    self.fail(f"{name} {ticket.stream_id}: billed {billed} s, delivered at least {fewest}")
                if billed < stream.usage_seen:
                    self.fail(
                        f"{name} {ticket.stream_id}: billed {billed} s, the worker said {stream.usage_seen}"
                    )
        if not lowest - CRASH_LOSS_SECONDS * crashes <= billed_total <= highest:
            self.fail(
                f"{name}: billed {billed_total} s, delivered {lowest}..{highest} with {crashes} crashes"
            )
        self.check_allowance(user, metadata, billed_total)

    def crashed(self, stream: SocketRecord, final: bool) -> bool | None:
        """Whether the crash cut this stream's reporting short; None when its final report went missing
        without one."""
        if final:
            return False
        soak = self.soak
        if stream.worker != soak.killed or soak.kill_at is None:
            return None
        # The final report of a stream that ended just before the kill may have died with the process.
        if stream.dropped or (stream.closed_at or 0) > soak.kill_at - 10:
            return True
        return None

    def check_single_service(self, name: str, ticket: TicketRecord) -> None:
        served = ticket.served
        by_worker = Counter(socket.worker for socket in ticket.sockets if socket.frames)
        if len(served) > 1 or len(by_worker) > 1:
            sockets = [
                f"{s.role} on {s.worker}: {len(s.frames)} frames, closed {s.close_code}"
                f"{' (dropped)' if s.dropped else ''} at +{(s.closed_at or 0) - self.soak.started_at:.1f} s"
                for s in ticket.sockets
            ]
            self.fail(f"{name} {ticket.stream_id}: served {len(served)} times: {sockets}")
        for socket in ticket.sockets:
            if not socket.admitted or socket in served:
                continue
            # Presented and not served: refused (4401), its claim unconfirmed (1013: the studio retries with
            # a new ticket), too slow to say hello after fetching the ticket (4408), or cut off by the crash.
            self.stats[f"{socket.role}_presented"] += 1
            if socket.close_code == CloseCode.BAD_TICKET:
                self.stats[f"{socket.role}_refused_4401"] += 1
            elif socket.close_code in (CloseCode.TRY_AGAIN_LATER, CloseCode.HELLO_TIMEOUT):
                self.stats[f"{socket.role}_closed_{socket.close_code}"] += 1
            elif socket.dropped and socket.worker == self.soak.killed:
                self.stats[f"{socket.role}_killed_before_ready"] += 1
            else:
                self.fail(
                    f"{name} {ticket.stream_id}: a {socket.role} connection that was not served closed with "
                    f"{socket.close_code} on {socket.worker} {socket.errors}"
                )

    def check_allowance(self, user: SimUser, metadata: BillingMetadata, billed_total: int) -> None:
        public = metadata.public
        name = user.email
        changes = [change for _, change in user.plan_changes]
        if public.seconds_used > self.catalogue.get(public.plan).seconds and public.plan != PlanId.FREE:
            self.fail(f"{name}: {public.seconds_used} s used of the {public.plan} plan")
        if not changes:
            self.stats["free_users"] += 1
            if public.plan != PlanId.FREE or public.free_seconds_used != billed_total:
                self.fail(
                    f"{name}: Free user shows {public.plan}, {public.free_seconds_used} s for {billed_total}"
                )
            if billed_total > self.free:
                self.fail(f"{name}: billed {billed_total} s on a {self.free} s Free plan")
            if user.out_of_minutes_at:
                self.stats["free_users_exhausted"] += 1
                if public.free_seconds_used != self.free:
                    self.fail(f"{name}: told out of minutes at {public.free_seconds_used} of {self.free} s")
        elif "cancelled" not in changes:
            self.stats["paid_users"] += 1
            expected = PlanId.ULTRA if changes[-1] == "ultra" else PlanId.PRO
            if public.plan != expected:
                self.fail(f"{name}: plan {public.plan} after {changes}")
            if public.free_seconds_used + public.seconds_used != billed_total:
                self.fail(
                    f"{name}: counters {public.free_seconds_used}+{public.seconds_used} for {billed_total}"
                )
            if public.free_seconds_used > self.free:
                self.fail(f"{name}: {public.free_seconds_used} s of a {self.free} s Free plan")
        else:
            self.stats["cancelled_users"] += 1
            cancelled_at = next(at for at, change in user.plan_changes if change == "cancelled")
            # Cancelling does not cut a running stream short: its ticket stands, and the rest of it counts
            # against Free (docs/metering.md). Only those streams may take the Free counter past the plan.
            carried = sum(
                self.stored[user.user_id].private.streams[t.stream_id].seconds
                for t in user.tickets
                if t.stream_id in metadata.private.streams
                and t.issued_at < cancelled_at
                and any((s.closed_at or math.inf) > cancelled_at for s in t.served)
            )
            if public.plan != PlanId.FREE or public.status != "cancelled":
                self.fail(f"{name}: {public.plan}/{public.status} after cancelling")
            if public.free_seconds_used > self.free + carried:
                self.fail(
                    f"{name}: {public.free_seconds_used} s on Free, {self.free} s + {carried} s carried over"
                )
            if billed_total > self.free + self.catalogue.get(PlanId.PRO).seconds:
                self.fail(f"{name}: billed {billed_total} s, more than Free and a Pro term")

    def check_logs(self, app_log: str, worker_logs: str) -> None:
        """No emulator answered 429, and the access log does show the emulators' traffic, so it would show
        one; every stream's final report reached the app (a SIGKILLed process sends none, and logs none)."""
        statuses = emulator_statuses(app_log)
        self.emulator_requests = statuses
        for emulator in ("clerk", "chargebee"):
            if not sum(n for (which, _), n in statuses.items() if which == emulator):
                self.fail(f"the app's access log shows no request to the {emulator} emulator: {statuses}")
        if refused := {key: n for key, n in statuses.items() if key[1] == 429}:
            self.fail(f"an emulator answered 429: {refused}")
        if "Clerk answered 429" in app_log or "HTTP 429" in worker_logs:
            self.fail("a 429 reached the app or a worker")
        if "gave up on the final usage report" in worker_logs:
            self.fail("a worker gave up on a final usage report")

    # ---- did the soak do what it says ----

    def check_coverage(self) -> None:
        soak, stats, plan = self.soak, self.stats, self.soak.plan
        streaming_users = sum(1 for user in soak.users if any(t.served for t in user.tickets))
        events = Counter[str]()
        for user in soak.users:
            events.update(user.events)
        self.stats.update({f"event_{key}": n for key, n in events.items()})
        expected = {
            "peak concurrent streams >= 50": soak.peak_live >= 50,
            "users streaming >= 20": streaming_users >= 20,
            "the worker was killed and restarted": soak.killed is not None and soak.restarted_at is not None,
            "crashed streams >= 3": stats["crashed_streams"] >= 3,
            "duplicate tabs refused >= 5": stats["duplicate_refused_4401"] >= 5,
            "duplicate tabs a few seconds in refused >= 5": stats["late_duplicate_refused_4401"] >= 5,
            "replays refused >= 3": stats["replay_refused_4401"] >= 3,
            "streams closed at the allowance >= 5": stats["closed_4402"] >= 5,
            "Free users told they are out of minutes >= 3": stats["free_users_exhausted"] >= 3,
            "every checkout, switch and cancellation done": (
                soak.events["upgrade"] == plan.upgrades
                and soak.events["cancel"] == plan.cancels
                and soak.events["ultra"] == plan.switches
            ),
        }
        for what, held in expected.items():
            if not held:
                self.fail(f"the soak did not exercise it: {what}")

    def summary(self, elapsed: float | None = None) -> str:
        soak = self.soak
        lines = [
            f"soak: {len(soak.users)} users, peak {soak.peak_live} concurrent streams "
            f"({soak.peak_live_users} users), killed {soak.killed} "
            f"at +{(soak.kill_at or 0) - soak.started_at:.1f} s, "
            f"wall {elapsed or 0:.0f} s",
            f"stats: {dict(sorted(self.stats.items()))}",
            f"crash losses (s): {sorted(self.losses)}",
            f"billing: {dict(soak.events)}",
            f"emulator answers (whole run): {dict(sorted(self.emulator_requests.items()))}",
        ]
        return "\n".join(lines)


# ---- the instruments -------------------------------------------------------------------------------------


def test_delivered_bounds_are_the_distinct_seconds_when_no_frame_straddles_one() -> None:
    frames = [(10.1, 10.2), (10.5, 10.6), (11.3, 11.4), (13.0, 13.9)]
    assert delivered_bounds(frames) == (3, 3) == (received_seconds(frames),) * 2
    assert delivered_bounds([]) == (0, 0)


def test_delivered_bounds_widen_only_by_the_frames_that_straddle_a_second() -> None:
    # Sent in second 10, received in 11: the worker billed 10 or 11.
    assert delivered_bounds([(10.9, 11.1)]) == (1, 1)
    assert delivered_bounds([(10.2, 10.3), (10.9, 11.1)]) == (1, 2)
    assert delivered_bounds([(10.9, 11.1), (11.2, 11.3)]) == (1, 2)
    assert delivered_bounds([(10.2, 10.3), (10.9, 11.1), (11.2, 11.3)]) == (2, 2)
    with pytest.raises(ValueError):
        delivered_bounds([(11.0, 10.0)])


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 3.0, allow_nan=False), st.floats(0.0, 1.0), st.floats(0.0, 1.5, allow_nan=False)
        ),
        max_size=30,
    )
)
def test_delivered_bounds_always_hold_what_the_worker_counts(steps: list[tuple[float, float, float]]) -> None:
    """Any worker timeline consistent with the client's: earliest <= delivered (worker clock) <= received, one
    frame at a time, counted as BillingMeter counts (a new second bills once)."""
    frames, billed, last_second, clock = [], 0, None, 1000.0
    for gap, render, transit in steps:
        sent = clock + gap
        delivered = sent + render
        received = delivered + transit
        second = math.floor(delivered)
        if last_second is None or second > last_second:
            billed, last_second = billed + 1, second
        frames.append((sent, received))
        clock = received
    fewest, most = delivered_bounds(frames)
    assert fewest <= billed <= most


def test_the_access_log_shows_an_emulator_429(start_app: Callable[..., AppProcess]) -> None:
    """The soak's 429 check reads the app's access log: a 429 the Clerk emulator answers shows in it."""
    app = start_app(LOG_LEVEL="INFO")
    clerk = app.clerk()
    user = clerk.users.create(email_address=["limits@example.com"])
    answers = []
    for index in range(12):  # Clerk allows 10 metadata writes per user per 10 s
        try:
            clerk.users.update_metadata(user_id=user.id, public_metadata={"n": index})
            answers.append(200)
        except Exception as exc:  # the SDK raises its own error type for a 429
            answers.append(getattr(exc, "status_code", 0))
    assert answers[-1] == 429, answers
    deadline = time.monotonic() + 10
    while (statuses := emulator_statuses(app.log()))[("clerk", 429)] < answers.count(429):
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
    assert statuses[("clerk", 200)] >= 10
