"""The soak's moving parts: the two workers as processes, simulated studio users, and what they saw.

Everything runs on loopback: `python -m app` (sandbox: the Clerk and ChargeBee emulators behind the real SDKs)
and two `python -m inference --engine preview` processes with the app's STREAM_SECRET, reporting usage and
claiming streams at the app. A simulated user is a browser tab that does what the studio does: waits for the
worker's `admitted`, fetches a ticket, says `hello`, streams camera frames one at a time (the first-outputs
phase of the studio's pacer, kept), and on a full worker (4503), an unconfirmed claim (1013), a ticket held
back (409 `minutes_in_use`) or a lost socket reconnects with a fresh ticket after the studio's back-off; it
stops on 4402 and 402 until it buys a plan, and refreshes its 60-second session token through the sandbox
Frontend API. A load balancer is played by picking one of the two workers at random. Every loop here is
bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from app.auth import SESSION_COOKIE
from app.settings import SANDBOX_CLERK_PREFIX
from inference.protocol import (
    Ack,
    Admitted,
    CloseCode,
    Error,
    Hello,
    Params,
    Ready,
    Usage,
    decode_server_message,
    encode_message,
    pack_frame,
    unpack_frame,
)
from tests.conftest import ROOT, clean_environment, stop_process, wait_until_healthy

CSRF_COOKIE = "stylecast_csrf"
PROMPT = "pixel art"  # the preview engine's cheapest style: the soak measures accounting, not filters
SUBSCRIPTION_FIELD = re.compile(r'name="subscription_id" value="([^"]+)"')
# At most two frames a second per stream: one a second bills every second, and the engines are the
# bottleneck anyway (every stream has a frame waiting at its turn).
FRAME_INTERVAL_SECONDS = 0.5
# The frame header's waited and render milliseconds are rounded, and measured on another clock.
HEADER_ROUNDING_SECONDS = 0.005
# Requests the app served for the sandbox emulators, from uvicorn's access log.
ACCESS_LINE = re.compile(
    r'"(GET|POST|PATCH|PUT|DELETE) (/sandbox/(?:clerk|chargebee)/\S*) HTTP/[\d.]+" (\d{3})'
)


@dataclass(frozen=True)
class SoakPlan:
    users: int
    soak_seconds: float
    free_seconds: int
    report_interval_seconds: float
    preview_delay_ms: int
    min_session_fps: float
    kill_after_seconds: float
    down_seconds: float
    stream_seconds: tuple[float, float]
    duplicate_share: float  # the same ticket to both workers at once
    late_duplicate_share: float  # ... and to the other worker a few seconds into the stream
    replay_share: float  # ... again after the stream ended
    upgrades: int  # users who buy Pro during the soak
    cancels: int  # of those, how many cancel it again in the portal
    switches: int  # of those, how many switch to Ultra in the portal
    seed: int


# ---- the worker processes ----------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """One `python -m inference` on a fixed port; each start is a new incarnation with its own worker id."""

    name: str
    port: int
    environment: dict[str, str]
    log_dir: Path
    cwd: Path
    incarnation: str = ""
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None and bool(self.incarnation)

    def start(self) -> None:
        """Start and wait until /health says ready (blocking: call it in a thread from async code)."""
        self.starts += 1
        incarnation = f"{self.name}{self.starts}"
        log_path = self.log_dir / f"worker-{incarnation}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "inference", "--port", str(self.port), "--engine", "preview"],
                cwd=self.cwd,
                env=clean_environment(PYTHONPATH=str(ROOT), WORKER_ID=incarnation, **self.environment),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.process = process
        wait_until_healthy(process, self.url, log_path, f"python -m inference ({incarnation})")
        self.incarnation = incarnation

    def kill(self) -> str:
        """SIGKILL, as a crashing container dies: no final report, no close frame. Returns the incarnation."""
        assert self.process is not None
        killed, self.incarnation = self.incarnation, ""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        return killed

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)

    def log(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())


def emulator_statuses(app_log: str) -> Counter[tuple[str, int]]:
    """How often each emulator ("clerk", "chargebee") answered each status, from the app's access log."""
    found: Counter[tuple[str, int]] = Counter()
    for _, path, status in ACCESS_LINE.findall(app_log):
        found[("clerk" if path.startswith(SANDBOX_CLERK_PREFIX) else "chargebee", int(status))] += 1
    return found


# ---- what the clients saw ----------------------------------------------------------------------------------


@dataclass
class SocketRecord:
    """One WebSocket connection of a simulated tab."""

    # "stream" (the tab's own); "duplicate", "late_duplicate", "replay": the same ticket on another
    # connection at once, a few seconds in, after the stream ended (SoakPlan).
    role: str
    worker: str = ""  # incarnation that accepted the connection, e.g. "b1"
    opened_at: float = 0.0
    admitted: bool = False
    ready_at: float | None = None
    closed_at: float | None = None
    close_code: int | None = None
    dropped: bool = False  # closed without a close frame: the worker's process died
    client_closed: bool = False
    # (earliest the worker can have delivered it, received), time.time(), per output, in arrival order.
    frames: list[tuple[float, float]] = field(default_factory=list)
    usage_seen: int = 0  # the worker's last `usage.seconds_used`
    errors: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.ready_at is not None and self.closed_at is None


@dataclass
class TicketRecord:
    stream_id: str
    token: str
    allowance: int
    issued_at: float
    sockets: list[SocketRecord] = field(default_factory=list)

    @property
    def served(self) -> list[SocketRecord]:
        """Sockets on which this ticket got `ready` or any styled frame."""
        return [s for s in self.sockets if s.ready_at is not None or s.frames]


@dataclass
class SimUser:
    index: int
    email: str
    client: httpx.AsyncClient
    user_id: str = ""
    session_expires: float = 0.0
    session_id: str = ""
    tickets: list[TicketRecord] = field(default_factory=list)
    replays: list[SocketRecord] = field(default_factory=list)
    # (time.time(), "pro" | "ultra" | "cancelled"), as the billing actions completed.
    plan_changes: list[tuple[float, str]] = field(default_factory=list)
    out_of_minutes_at: list[float] = field(default_factory=list)  # 402 answers
    events: Counter[str] = field(default_factory=Counter)
    reconnect_attempt: int = 0
    plan_changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def csrf(self) -> str:
        return self.client.cookies.get(CSRF_COOKIE) or ""


class SoakError(AssertionError):
    """Something a user could not do at all (sign in, buy a plan): the soak cannot go on."""


# ---- the simulation ----------------------------------------------------------------------------------------


class Soak:
    def __init__(self, plan: SoakPlan, app_url: str, workers: list[WorkerProcess], jpeg: bytes) -> None:
        self.plan = plan
        self.app_url = app_url
        self.workers = workers
        self.jpeg = jpeg
        self.random = random.Random(plan.seed)
        self.users: list[SimUser] = []
        self.stop = asyncio.Event()
        self.started_at = 0.0
        self.kill_at: float | None = None
        self.killed: str | None = None
        self.restarted_at: float | None = None
        self.peak_live = 0
        self.peak_live_users = 0
        self.events: Counter[str] = Counter()
        self.billing_errors: list[str] = []

    # ---- sign-in and session upkeep ----

    async def sign_in(self, user: SimUser) -> None:
        client = user.client
        await client.get("/sign-in")
        answer = await client.post("/sign-in", data={"email": user.email, "_csrf_token": user.csrf})
        if answer.status_code != 303:
            raise SoakError(f"sign-in of {user.email}: {answer.status_code} {answer.text[:200]}")
        self._read_session(user)

    def _read_session(self, user: SimUser) -> None:
        token = user.client.cookies.get(SESSION_COOKIE, path="/")
        if not token:
            raise SoakError(f"{user.email} has no session cookie")
        claims = jwt.decode(token, options={"verify_signature": False})
        user.user_id, user.session_id, user.session_expires = (
            claims["sub"],
            claims["sid"],
            float(claims["exp"]),
        )

    async def refresh_session(self, user: SimUser) -> None:
        """What the sandbox's frontend script (and ClerkJS) does: a new 60-second token from the Frontend API
        with the browser's `__client` cookie."""
        origin = f"{urlsplit(self.app_url).scheme}://{urlsplit(self.app_url).netloc}"
        answer = await user.client.post(
            f"{SANDBOX_CLERK_PREFIX}/client/sessions/{user.session_id}/tokens", headers={"origin": origin}
        )
        if answer.status_code != 200:
            raise SoakError(f"session refresh of {user.email}: {answer.status_code} {answer.text[:200]}")
        self._read_session(user)

    async def post_form(self, user: SimUser, path: str, data: dict[str, str]) -> httpx.Response:
        if user.session_expires - time.time() < 20:
            await self.refresh_session(user)
        return await user.client.post(path, data={**data, "_csrf_token": user.csrf})

    async def ticket(self, user: SimUser) -> httpx.Response:
        for _ in range(2):
            if user.session_expires - time.time() < 20:
                await self.refresh_session(user)
            answer = await user.client.post("/api/stream/ticket", headers={"x-csrftoken": user.csrf})
            if answer.status_code != 401:
                return answer
            user.events["ticket_401"] += 1
            await self.refresh_session(user)
        return answer

    # ---- one connection ----

    def _pick_worker(self, avoid: str | None = None) -> WorkerProcess:
        choices = [w for w in self.workers if w.name != avoid] or self.workers
        return self.random.choice(choices)

    async def _open(self, worker: WorkerProcess, record: SocketRecord) -> ClientConnection | None:
        """Connect and wait for `admitted`; None (and the record says why) otherwise."""
        record.opened_at = time.time()
        try:
            connection = await connect(
                worker.ws_url, open_timeout=10, close_timeout=3, max_size=4 * 1024 * 1024, compression=None
            )
        except (OSError, InvalidHandshake, TimeoutError):
            record.errors.append("connect failed")
            record.closed_at = time.time()
            return None
        record.worker = worker.incarnation or f"{worker.name}?"
        try:
            first = decode_server_message(await asyncio.wait_for(connection.recv(), 10))
        except ConnectionClosed as closed:
            record.close_code = closed.rcvd.code if closed.rcvd is not None else None
            record.dropped = closed.rcvd is None
            record.closed_at = time.time()
            return None
        except TimeoutError:
            record.errors.append("no admitted within 10 s")
            await connection.close()
            record.closed_at = time.time()
            return None
        if not isinstance(first, Admitted):
            record.errors.append(f"first message {first!r}")
            await connection.close()
            record.closed_at = time.time()
            return None
        record.admitted = True
        return connection

    async def _drive(
        self, connection: ClientConnection, record: SocketRecord, token: str, stream_seconds: float
    ) -> None:
        """hello, then frames one at a time until `stream_seconds` after `ready` (or the soak's end), then
        a clean close once the last frame's output (and the usage message behind it) is in."""
        frame_id, outstanding, next_send = 0, dict[int, float](), 0.0
        stop_at: float | None = None
        hello_at = time.time()

        async def send_frame() -> None:
            nonlocal frame_id
            frame_id += 1
            outstanding[frame_id] = time.time()
            await connection.send(pack_frame(frame_id, self.jpeg))

        try:
            await connection.send(encode_message(Hello(ticket=token)))
            await connection.send(encode_message(Params(prompt=PROMPT)))
            await send_frame()  # right behind the hello, as a tab that already has its camera on
            for _ in range(100_000):
                now = time.time()
                if record.ready_at is None and now - hello_at > 30:
                    record.errors.append("no ready within 30 s")
                    break
                if stop_at is None and record.ready_at is not None and self.stop.is_set():
                    stop_at = now
                if stop_at is not None and now >= stop_at:
                    for sent_id, sent_at in list(outstanding.items()):
                        if now - sent_at > 5:  # lost with a replaced or failed render: forget it
                            del outstanding[sent_id]
                    if not outstanding:
                        await self._linger(connection, record)
                        record.client_closed = True
                        await connection.close()
                        return
                elif not outstanding and now >= next_send:
                    await send_frame()
                try:
                    data = await asyncio.wait_for(connection.recv(), 0.25)
                except TimeoutError:
                    for sent_id, sent_at in list(outstanding.items()):
                        if time.time() - sent_at > 10:
                            del outstanding[sent_id]
                    continue
                received = time.time()
                if isinstance(data, bytes):
                    output = unpack_frame(data)
                    sent_at = outstanding.pop(output.frame_id, None)
                    if sent_at is None:
                        record.errors.append(f"output for frame {output.frame_id}, which is not outstanding")
                        continue
                    # The frame arrived after it was sent, then waited and rendered for what its header
                    # says; the worker read its billing clock after that (tests/soak/accounting.py).
                    rendered = (max(output.waited_ms, 0) + output.render_ms) / 1000 - HEADER_ROUNDING_SECONDS
                    record.frames.append((min(sent_at + max(rendered, 0.0), received), received))
                    next_send = sent_at + FRAME_INTERVAL_SECONDS
                    continue
                message = decode_server_message(data)
                if isinstance(message, Ready):
                    record.ready_at = received
                    stop_at = received + stream_seconds
                elif isinstance(message, Usage):
                    record.usage_seen = max(record.usage_seen, message.seconds_used)
                elif isinstance(message, Error):
                    record.errors.append(f"error {message.code}")
                    if message.frame is not None:
                        outstanding.pop(message.frame, None)
                elif not isinstance(message, Ack):
                    record.errors.append(f"unexpected {message!r}")
            record.client_closed = True
            await connection.close()
        except ConnectionClosed as closed:
            record.close_code = closed.rcvd.code if closed.rcvd is not None else None
            record.dropped = closed.rcvd is None and not record.client_closed
        finally:
            record.closed_at = time.time()

    async def _linger(self, connection: ClientConnection, record: SocketRecord) -> None:
        """Read what the worker still sends for a moment: a `usage` follows the frame that opened a
        second, and the client stopped sending, so nothing more will be rendered."""
        deadline = time.time() + 0.4
        while (left := deadline - time.time()) > 0:
            try:
                data = await asyncio.wait_for(connection.recv(), left)
            except TimeoutError:
                return
            if isinstance(data, str):
                message = decode_server_message(data)
                if isinstance(message, Usage):
                    record.usage_seen = max(record.usage_seen, message.seconds_used)

    # ---- one user ----

    async def run_user(self, user: SimUser) -> None:
        plan = self.plan
        for _ in range(500):
            if self.stop.is_set():
                return
            if user.out_of_minutes_at and (
                not user.plan_changes or user.plan_changes[-1][0] < user.out_of_minutes_at[-1]
            ):
                # Out of minutes: the studio shows the plans; the user comes back once they bought one.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(user.plan_changed.wait(), 1.0)
                user.plan_changed.clear()
                continue
            worker = self._pick_worker()
            record = SocketRecord(role="stream")
            connections = [(await self._open(worker, record), record)]
            if connections[0][0] is None:
                user.events["worker_full" if record.close_code == CloseCode.WORKER_FULL else "no_socket"] += 1
                await self._back_off(user)
                continue
            if self.random.random() < plan.duplicate_share:
                # The tab duplicated: its copy, admitted by the other worker, will present the same ticket
                # at the same moment.
                twin = SocketRecord(role="duplicate")
                connections.append((await self._open(self._pick_worker(avoid=worker.name), twin), twin))
            answer = await self.ticket(user)
            if answer.status_code != 200:
                for connection, _ in connections:
                    if connection is not None:
                        await connection.close()
                if answer.status_code == 402:
                    user.out_of_minutes_at.append(time.time())
                    user.events["402"] += 1
                else:
                    user.events[str(answer.status_code)] += 1  # 409 minutes_in_use, mostly
                    await self._back_off(user)
                continue
            body = answer.json()
            ticket = TicketRecord(
                stream_id=body["stream_id"],
                token=body["ticket"],
                allowance=body["allowance_seconds"],
                issued_at=time.time(),
            )
            user.tickets.append(ticket)
            stream_seconds = self.random.uniform(*plan.stream_seconds)
            drives = []
            for connection, socket in connections:
                ticket.sockets.append(socket)
                if connection is not None:
                    drives.append(self._drive(connection, socket, ticket.token, stream_seconds))
            if self.random.random() < plan.late_duplicate_share:
                drives.append(self.late_duplicate(ticket, avoid=worker.name))
            await asyncio.gather(*drives)
            codes = [s.close_code for s in ticket.sockets]
            if CloseCode.ALLOWANCE_USED in codes:
                user.events["4402"] += 1
            if CloseCode.TRY_AGAIN_LATER in codes:
                user.events["1013"] += 1
            if not ticket.served:
                await self._back_off(user)
                continue
            user.reconnect_attempt = 0
            # A client that lost its socket and says hello again with the same ticket, or a stale tab.
            if any(s.dropped for s in ticket.served) or self.random.random() < plan.replay_share:
                await self.replay(user, ticket)

    async def _back_off(self, user: SimUser) -> None:
        """The studio's reconnect delay: 0.5 s doubling to 10 s, +-25 %, until a stream gets going."""
        delay = min(10.0, 0.5 * 2**user.reconnect_attempt) * self.random.uniform(0.75, 1.25)
        user.reconnect_attempt += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)

    async def late_duplicate(self, ticket: TicketRecord, avoid: str) -> None:
        """A second tab presenting the ticket on the other worker while the stream has been running for a
        few seconds (its reports are in by then)."""
        for _ in range(200):
            if self.stop.is_set() or any(s.closed_at is not None for s in ticket.served):
                return
            ready = [s.ready_at for s in ticket.sockets if s.ready_at is not None]
            if ready and time.time() - ready[0] >= 2.5:
                break
            await asyncio.sleep(0.1)
        else:
            return
        record = SocketRecord(role="late_duplicate")
        ticket.sockets.append(record)
        connection = await self._open(self._pick_worker(avoid=avoid), record)
        if connection is not None:
            await self._drive(connection, record, ticket.token, 1.0)

    async def replay(self, user: SimUser, ticket: TicketRecord) -> None:
        """The ticket of a stream that ended, presented again (a stale tab, a copied URL)."""
        record = SocketRecord(role="replay")
        connection = await self._open(self._pick_worker(), record)
        ticket.sockets.append(record)
        user.replays.append(record)
        if connection is not None:
            await self._drive(connection, record, ticket.token, 1.0)

    # ---- ChargeBee: plans bought, changed and cancelled while users stream ----

    async def upgrade(self, user: SimUser) -> None:
        started = await self.post_form(user, "/api/billing/checkout", {"plan": "pro"})
        if started.status_code != 303:
            raise SoakError(f"checkout of {user.email}: {started.status_code} {started.text[:200]}")
        page = urlsplit(started.headers["location"]).path
        if (await user.client.get(page)).status_code != 200:
            raise SoakError(f"checkout page of {user.email} is not there")
        paid = await self.post_form(user, f"{page}/pay", {})
        if paid.status_code != 303:
            raise SoakError(f"payment of {user.email}: {paid.status_code} {paid.text[:200]}")
        landing = urlsplit(paid.headers["location"])
        back = await user.client.get(f"{landing.path}?{landing.query}")
        if back.status_code != 200:
            raise SoakError(f"account page after checkout of {user.email}: {back.status_code}")
        self._changed(user, "pro")

    async def portal_action(self, user: SimUser, action: str, **extra: str) -> None:
        opened = await self.post_form(user, "/api/billing/portal", {})
        if opened.status_code != 303:
            raise SoakError(f"portal of {user.email}: {opened.status_code} {opened.text[:200]}")
        path = urlsplit(opened.headers["location"]).path
        shown = SUBSCRIPTION_FIELD.findall((await user.client.get(path)).text)
        if not shown:
            raise SoakError(f"the portal of {user.email} shows no subscription")
        done = await self.post_form(
            user, f"{path}/action", {"subscription_id": shown[0], "action": action, **extra}
        )
        if done.status_code != 303:
            raise SoakError(f"portal {action} of {user.email}: {done.status_code} {done.text[:200]}")

    def _changed(self, user: SimUser, plan: str) -> None:
        user.plan_changes.append((time.time(), plan))
        user.plan_changed.set()

    async def run_billing(self, ultra_item_price: str) -> None:
        """Checkouts spread over the first half, then Ultra switches and cancellations in the portal."""
        plan = self.plan
        buyers = self.users[: plan.upgrades]
        half = plan.soak_seconds / 2
        steps: list[tuple[float, SimUser, str]] = [
            (2 + index * (half - 2) / max(1, len(buyers)), user, "upgrade")
            for index, user in enumerate(buyers)
        ]
        for index, user in enumerate(buyers[: plan.cancels]):
            steps.append((half + 4 + index * 1.5, user, "cancel"))
        for index, user in enumerate(buyers[plan.cancels : plan.cancels + plan.switches]):
            steps.append((half + 5 + index * 1.5, user, "ultra"))
        steps.sort(key=lambda step: step[0])
        tasks: list[asyncio.Task[None]] = []
        for at, user, action in steps:
            delay = self.started_at + at - time.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            if self.stop.is_set():
                break
            tasks.append(asyncio.create_task(self._billing_step(user, action, ultra_item_price)))
        await asyncio.gather(*tasks)

    async def _billing_step(self, user: SimUser, action: str, ultra_item_price: str) -> None:
        try:
            if action == "upgrade":
                await self.upgrade(user)
            elif action == "cancel":
                await self.portal_action(user, "cancel_now")
                self._changed(user, "cancelled")
            else:
                await self.portal_action(user, "change_plan", item_price_id=ultra_item_price)
                self._changed(user, "ultra")
            self.events[action] += 1
        except (SoakError, httpx.HTTPError) as exc:
            self.billing_errors.append(f"{action} for {user.email}: {exc}")

    # ---- the crash ----

    async def run_crash(self, victim: WorkerProcess) -> None:
        """SIGKILL `victim` while it serves streams, then start it again on the same port."""
        deadline = self.started_at + self.plan.kill_after_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, deadline - time.time()))
        for _ in range(100):  # up to 10 s more, until it carries a fair share of the streams
            if self.stop.is_set() or self._live_on(victim.incarnation) >= 5:
                break
            await asyncio.sleep(0.1)
        if self.stop.is_set():
            return
        self.kill_at = time.time()
        self.killed = victim.kill()
        await asyncio.sleep(self.plan.down_seconds)
        await asyncio.to_thread(victim.start)
        self.restarted_at = time.time()

    def _live_on(self, incarnation: str) -> int:
        return sum(1 for record in self.all_sockets() if record.worker == incarnation and record.live)

    # ---- watching ----

    def all_sockets(self) -> list[SocketRecord]:
        return [socket for user in self.users for ticket in user.tickets for socket in ticket.sockets]

    async def run_monitor(self) -> None:
        for _ in range(10_000):
            if self.stop.is_set():
                return
            live_users = [u for u in self.users if any(s.live for t in u.tickets for s in t.sockets)]
            live = sum(1 for socket in self.all_sockets() if socket.live)
            self.peak_live = max(self.peak_live, live)
            self.peak_live_users = max(self.peak_live_users, len(live_users))
            await asyncio.sleep(0.25)

    # ---- the whole soak ----

    async def run(self, ultra_item_price: str, victim: WorkerProcess) -> None:
        self.users = [
            SimUser(
                index=index,
                email=f"soak-{index:03d}@example.com",
                client=httpx.AsyncClient(base_url=self.app_url, timeout=30, follow_redirects=False),
            )
            for index in range(self.plan.users)
        ]
        gate = asyncio.Semaphore(8)

        async def sign_in(user: SimUser) -> None:
            async with gate:
                await self.sign_in(user)

        try:
            await asyncio.gather(*(sign_in(user) for user in self.users))
            self.started_at = time.time()
            users = [asyncio.create_task(self.run_user(user)) for user in self.users]
            helpers = [
                asyncio.create_task(self.run_monitor()),
                asyncio.create_task(self.run_billing(ultra_item_price)),
                asyncio.create_task(self.run_crash(victim)),
            ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.plan.soak_seconds)
            self.stop.set()
            # Streams end cleanly (each is at most a drain and a close away), the rest winds down.
            done, late = await asyncio.wait([*users, *helpers], timeout=60)
            for task in late:
                task.cancel()
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if late:
                raise AssertionError(f"{len(late)} simulated users or helpers did not wind down in 60 s")
        finally:
            for user in self.users:
                await user.client.aclose()


def run_in_thread(main: Callable[[], Any]) -> Any:
    """`asyncio.run` on a thread of its own (a browser test may have left an event loop on this one)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(main())).result()
