"""The web app's request load at N concurrent streams, measured against one `python -m app` process.

    uv run --group test python -m bench.app_load --streams 1000 --seconds 60

What one live stream asks of the app (app/routes/worker_requests.py, app/routes/stream.py,
billing/ledger_store.py):

* the worker's signed usage report, `POST /api/usage/report`, every 5 s (USAGE_REPORT_INTERVAL_SECONDS),
  answered at once from the app's pending state while the stream runs;
* the studio tab's meter poll, `GET /partials/usage-meter` with HX-Request and the session cookie, every
  5 s (app/templates/studio.html, `hx-trigger="every 5s"`);
* per stream start a ticket (`POST /api/stream/ticket`, CSRF header) and the worker's signed claim
  (`POST /api/stream/claim`), and per stream end a final report, written to Clerk before it is answered.
  Streams last an exponentially distributed time (mean `--mean-stream-seconds`, 300 s), so N streams
  start N/mean times a second and the load is in its steady state from the first second;
* in sandbox mode also the browser's session refresh at the sandbox Frontend API (60-second tokens
  refreshed every 50 s, app/static/sandbox_clerk.js), which live Clerk serves from its own servers.

ChargeBee webhooks arrive a few times per subscription per month and are left out.

The tool starts `python -m app` in sandbox mode on a free loopback port with a fresh state directory
(the in-process preview worker is never connected to), signs N users in through the sandbox sign-in form
(one stream per user: a live stream reserves everything its account has left, billing/ledger.py, so a
second stream of the same user would be refused; `--spare-users` more take over the streams that end,
so a restart never waits on its own user's write spacing), gets each stream a ticket and claims it as
the worker does (the initial streams spread over `--ramp-seconds`), then fires every request at its due
time from one schedule (open loop): a late answer never delays the next request, and latency is measured
from the time a request was due, so a stalled app or generator shows in the figures instead of thinning
the load (coordinated omission). A meter answered 200 without the minutes (Clerk failed) counts as an
error. This process is the load generator, with a small HTTP/1.1 client of its own (below); the app is a
separate process, and both processes' CPU and the machine's are read from /proc.

The Clerk emulator runs inside the app and exposes no counters over HTTP; the SDK reaches it over HTTP on
the app's own port, so with the app's default LOG_LEVEL (INFO) its Backend API requests are counted from
uvicorn's access log. At `--log-level WARNING` they cannot be seen and the record says so.

It prints a table and writes `bench/results/<UTC time>-app-load-<N>-streams.json`. `--py-spy FILE`
samples the app during the measured window (run under `uv run --with py-spy ...`); `--workdir DIR` keeps
the app's state and log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import urlencode, urlsplit

import httptools
import httpx
import msgspec

from app.__main__ import KEEP_ALIVE_SECONDS
from app.settings import LIVE_ALSO_REQUIRED, LIVE_KEYS
from inference.protocol import StreamClaim, UsageReport
from inference.signing import Purpose, encode_signed
from inference.tickets import verify_ticket
from inference.usage_reporter import encode_usage_report

ROOT: Final = Path(__file__).resolve().parent.parent
# A connection idle this long is closed by the client, before the app's keep-alive timeout closes it under
# a request in flight.
IDLE_SECONDS: Final = KEEP_ALIVE_SECONDS - 4.0
FRONTEND: Final = "/sandbox/clerk/v1/client"
WORKER_ID: Final = "bench-app-load"
# A refused start is tried again this much later (a person pressing Start again), not at once: retrying
# at once would turn an overloaded app's refusals into a storm of tickets.
RETRY_START_SECONDS: Final = 5.0
# The p99 budget for the stream load a single app process must carry: reports, meter polls and tickets.
TARGET_P99_MS: Final = 100.0

# Endpoints in the order the table shows them; the last column of each row is what it stands for.
ENDPOINTS: Final = {
    "report": "POST /api/usage/report, running stream (signed)",
    "meter": "GET /partials/usage-meter (htmx poll)",
    "ticket": "POST /api/stream/ticket (session + CSRF)",
    "claim": "POST /api/stream/claim (signed)",
    "final": "POST /api/usage/report, final (signed)",
    "refresh": "POST /sandbox/clerk/v1/client/sessions/{id}/tokens (sandbox only)",
}
# The stream load the p99 budget applies to; claims and final reports are answered once written to Clerk
# (per-user write spacing, billing/ledger_store.py) and are reported beside it.
BUDGETED: Final = ("report", "meter", "ticket")

_ACCESS_LINE = re.compile(rb'"(GET|POST|PATCH|PUT|DELETE) (/[^ ?"]*)[^"]* HTTP/[0-9.]+" (\d{3})')
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


# ---- the measured requests -----------------------------------------------------------------------------


class Sample(msgspec.Struct, array_like=True):
    """One request: when it was due, sent and answered (loop seconds), and how it ended."""

    due: float
    sent: float
    done: float  # math.inf: not answered before the run ended
    status: int  # 0: transport error, -1: unanswered
    error: str | None


@dataclass
class Recorder:
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {name: [] for name in ENDPOINTS})
    # Running reports the app answered as durable: it had no cached account and went to Clerk at once.
    urgent_reports: list[float] = field(default_factory=list)

    def add(self, endpoint: str, sample: Sample) -> None:
        self.samples[endpoint].append(sample)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (inf stays inf: an unanswered request)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(samples: Iterable[Sample], start: float, end: float) -> dict[str, Any]:
    """Figures for the requests due in [start, end): latency from the due time, errors included (an
    unanswered one counts as infinitely slow), rates per second of the window."""
    window = [sample for sample in samples if start <= sample.due < end]
    seconds = end - start
    latencies = sorted((sample.done - sample.due) * 1000 for sample in window)
    lags = sorted((sample.sent - sample.due) * 1000 for sample in window)
    errors = Counter(sample.error for sample in window if sample.error is not None)
    answered_ok = sum(1 for sample in window if sample.error is None)

    def ms(value: float) -> float | None:
        return None if math.isnan(value) or math.isinf(value) else round(value, 2)

    return {
        "count": len(window),
        "ok": answered_ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "scheduled_per_s": round(len(window) / seconds, 2) if seconds > 0 else None,
        "achieved_per_s": round(answered_ok / seconds, 2) if seconds > 0 else None,
        "p50_ms": ms(percentile(latencies, 0.50)),
        "p95_ms": ms(percentile(latencies, 0.95)),
        "p99_ms": ms(percentile(latencies, 0.99)),
        "max_ms": ms(latencies[-1]) if latencies else None,
        "unanswered": sum(1 for value in latencies if math.isinf(value)),
        # How late the generator sent requests: large values mean the generator, not the app, was busy.
        "send_lag_p99_ms": ms(percentile(lags, 0.99)),
        "send_lag_max_ms": ms(lags[-1]) if lags else None,
    }


# ---- the app under test --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class AppUnderTest:
    url: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, workdir: Path, env_overrides: dict[str, str]) -> AppUnderTest:
        port = free_port()
        state = workdir / "state"
        log_path = workdir / "app.log"
        env = {
            k: v for k, v in os.environ.items() if k not in (*LIVE_KEYS, *LIVE_ALSO_REQUIRED, "INFERENCE_URL")
        }
        env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        env.update(env_overrides)
        for key in ("STYLECAST_MODE", "STYLECAST_HOST", "STYLECAST_PORT", "STYLECAST_STATE_DIR", "APP_URL"):
            env.pop(key, None)
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "app", "--port", str(port), "--state-dir", str(state)],
                cwd=workdir,  # no .env from a checkout
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        app = cls(url=f"http://127.0.0.1:{port}", state_dir=state, process=process, log_path=log_path)
        app.wait_until_healthy()
        return app

    def wait_until_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"python -m app exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"python -m app did not become healthy:\n{self.log_tail()}")
            time.sleep(0.1)

    def stream_secret(self) -> str:
        from sandbox.keys import SECRETS_FILE

        return str(json.loads((self.state_dir / SECRETS_FILE).read_bytes())["stream_secret"])

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_slice(self, start: int, end: int) -> bytes:
        with self.log_path.open("rb") as handle:
            handle.seek(start)
            return handle.read(max(0, end - start))

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


# ---- CPU and machine load ------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # steal included, guest already counted in user
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def load_average() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


@dataclass
class CpuSnapshot:
    at: float
    app: float
    generator: float
    machine_busy: float
    machine_total: float
    load: list[float]

    @classmethod
    def take(cls, app_pid: int) -> CpuSnapshot:
        busy, total = machine_cpu_seconds()
        return cls(
            at=time.monotonic(),
            app=process_cpu_seconds(app_pid),
            generator=process_cpu_seconds(os.getpid()),
            machine_busy=busy,
            machine_total=total,
            load=load_average(),
        )


def cpu_between(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, Any]:
    """Cores used on average over the window (1.0 = one core busy all the time)."""
    wall = after.at - before.at
    app = (after.app - before.app) / wall
    generator = (after.generator - before.generator) / wall
    busy = (after.machine_busy - before.machine_busy) / wall
    return {
        "cores": os.cpu_count(),
        "app_cores": round(app, 3),
        "generator_cores": round(generator, 3),
        "machine_busy_cores": round(busy, 3),
        # Everything else on the machine (other engineers' tests, the kernel's own work).
        "other_cores": round(max(0.0, busy - app - generator), 3),
        "load_average_before": before.load,
        "load_average_after": after.load,
    }


# ---- the generator's HTTP/1.1 client -------------------------------------------------------------------
#
# httpx's connection pool re-examines every queued request against every connection whenever one changes
# hands; once a few hundred requests queue (claims wait ~1 s on their user's write spacing) the generator
# spent its CPU there and stopped sending, so the load collapsed instead of being measured. This client
# hands a free connection to the next waiter in O(1), parses answers with httptools (uvicorn's parser)
# and gives every simulated browser connections of its own, as browsers have.


class TransportError(Exception):
    """The connection failed or closed before a whole answer arrived."""


class Answer(msgspec.Struct):
    status_code: int
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes
    sent: float  # loop time the request's bytes were written

    def get_list(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[Answer, bool]] | None = None
        self.closed = False
        self.received = False  # any byte of the current answer
        self.last_used = 0.0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._sent = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"unparsable answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(TransportError(f"connection closed: {exc or 'by the server'}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer = Answer(self.parser.get_status_code(), self._headers, b"".join(self._body), self._sent)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((answer, self.parser.should_keep_alive()))

    def _fail(self, error: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)

    async def exchange(self, request: bytes) -> Answer:
        if self.closed or self.transport is None:
            raise TransportError("connection closed")
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self._headers, self._body, self.received = [], [], False
        self._sent = loop.time()
        self.transport.write(request)
        answer, keep_alive = await self.waiter
        if not keep_alive:
            self.close()
        return answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpPool:
    """Keep-alive connections to one server, at most `max_connections`; waiters are served in order."""

    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int,
        *,
        idle_seconds: float = IDLE_SECONDS,
        timeout: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        self.timeout = timeout  # for a whole request, waiting for a connection included
        self.max_connections = max_connections
        # uvicorn closes a connection idle for 5 s; one idle this long is not reused.
        self.idle_seconds = idle_seconds
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Answer:
        head = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        async with asyncio.timeout(self.timeout):
            for attempt in range(2):
                connection, reused = await self._acquire()
                try:
                    answer = await connection.exchange(data)
                except TransportError:
                    self._discard(connection)
                    # A kept-alive connection the server closed as we wrote: try once on a new one.
                    if reused and not connection.received and attempt == 0:
                        continue
                    raise
                except BaseException:
                    self._discard(connection)
                    raise
                self._release(connection)
                return answer
        raise AssertionError("unreachable")

    async def _acquire(self) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and loop.time() - connection.last_used < self.idle_seconds:
                return connection, True
            connection.close()
            self.open -= 1
        if self.open >= self.max_connections:
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._hand_back(waiter.result())
                raise
            if handed is not None:
                return handed, True
            # A connection closed and its slot was handed over: open a new one in it.
        else:
            self.open += 1
        try:
            _, protocol = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            self.open -= 1
            self._wake_for_slot()
            raise TransportError(f"connect failed: {exc}") from exc
        return protocol, False

    def _hand_back(self, connection: _Connection | None) -> None:
        if connection is None:
            self.open -= 1
            self._wake_for_slot()
        else:
            self._release(connection)

    def _release(self, connection: _Connection) -> None:
        if connection.closed:
            self._discard(connection)
            return
        connection.last_used = asyncio.get_running_loop().time()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self.idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self.open -= 1
        self._wake_for_slot()

    def _wake_for_slot(self) -> None:
        while self.waiters and self.open < self.max_connections:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.open += 1
                waiter.set_result(None)
                return

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


# ---- users, streams and the schedule -------------------------------------------------------------------


@dataclass(eq=False)
class User:
    email: str
    user_id: str = ""
    session_id: str = ""
    # Cookies the browser holds for the app's paths; the client cookie goes to the Frontend API only.
    cookies: dict[str, str] = field(default_factory=dict)
    client_token: str = ""
    token_issued: float = 0.0  # loop time of the current session token
    pool: HttpPool | None = None  # the browser's own connections (at most 6, as browsers open per host)

    def app_cookies(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())

    def frontend_cookies(self) -> str:
        return f"{self.app_cookies()}; __client={self.client_token}"

    def take_cookies(self, answer: Answer) -> None:
        for header in answer.get_list("set-cookie"):
            parsed: SimpleCookie = SimpleCookie()
            parsed.load(header)
            for name, morsel in parsed.items():
                if name == "__client":
                    self.client_token = morsel.value
                elif morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value


@dataclass(eq=False)
class Stream:
    user: User
    stream_id: str
    ticket_id: str
    allowance: int
    claimed_wall: float  # Unix time of the claim: the worker's billable seconds count from here
    ends: float  # loop time


class SetupFailed(Exception):
    pass


def _meter_shows_minutes(answer: Answer) -> str | None:
    """The meter answers 200 with "can't be shown right now" when Clerk failed: that is an error too."""
    if b'data-testid="usage-meter-body"' in answer.body:
        return None
    return "200 without the minutes (account unavailable)"


class LoadRun:
    def __init__(self, args: argparse.Namespace, app: AppUnderTest, secret: str) -> None:
        self.args = args
        self.app = app
        self.secret = secret
        self.recorder = Recorder()
        self.users: list[User] = []
        self.idle: deque[User] = deque()
        self.streams: set[Stream] = set()
        self.stopping = False
        self.inflight: set[asyncio.Task[Any]] = set()
        self.loops: set[asyncio.Task[Any]] = set()
        self.random = random.Random(args.seed)
        self.setup_errors: Counter[str] = Counter()
        origin = urlsplit(app.url)
        self.host, self.port = origin.hostname or "127.0.0.1", origin.port or 80
        # The worker's reporter and claimer share one client; each browser has its own (User.pool).
        self.worker = HttpPool(self.host, self.port, args.connections)

    # ---- plumbing --------------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _until(self, due: float) -> None:
        delay = due - self.now
        if delay > 0:
            await asyncio.sleep(delay)

    def _spawn(self, coroutine: Awaitable[Any], registry: set[asyncio.Task[Any]] | None = None) -> None:
        tasks = self.inflight if registry is None else registry
        task = asyncio.ensure_future(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def browser(self, user: User) -> HttpPool:
        if user.pool is None:
            user.pool = HttpPool(self.host, self.port, 6)
        return user.pool

    async def _request(
        self,
        endpoint: str,
        due: float,
        pool: HttpPool,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes = b"",
        *,
        expect: int = 200,
        check: Callable[[Answer], str | None] | None = None,
    ) -> Answer | None:
        try:
            answer = await pool.request(method, path, headers, body)
        except (TransportError, TimeoutError) as exc:
            self.recorder.add(endpoint, Sample(due, due, self.now, 0, type(exc).__name__))
            return None
        except asyncio.CancelledError:
            self.recorder.add(endpoint, Sample(due, due, math.inf, -1, "unanswered"))
            raise
        error = None if answer.status_code == expect else f"HTTP {answer.status_code}"
        if error is None and check is not None:
            error = check(answer)
        self.recorder.add(endpoint, Sample(due, answer.sent, self.now, answer.status_code, error))
        return answer

    # ---- signing in ------------------------------------------------------------------------------------

    async def sign_in(self, user: User) -> None:
        """The sandbox sign-in form, as a browser fills it in, then the client's session (sandbox_clerk.js
        reads it the same way)."""
        pool = self.browser(user)
        page = await pool.request("GET", "/sign-in", {"accept": "text/html"})
        if page.status_code != 200:
            raise SetupFailed(f"GET /sign-in answered {page.status_code}")
        user.take_cookies(page)
        csrf = user.cookies.get("stylecast_csrf")
        if not csrf:
            raise SetupFailed("GET /sign-in set no CSRF cookie")
        for attempt in range(6):
            form = urlencode({"email": user.email, "next": "/studio", "_csrf_token": csrf}).encode()
            answer = await pool.request(
                "POST",
                "/sign-in",
                {
                    "cookie": user.app_cookies(),
                    "origin": self.app.url,
                    "accept": "text/html",
                    "content-type": "application/x-www-form-urlencoded",
                },
                form,
            )
            if answer.status_code == 303:
                break
            self.setup_errors[f"sign-in HTTP {answer.status_code}"] += 1
            await asyncio.sleep(0.5 * 2**attempt)
        else:
            raise SetupFailed(f"sign-in of {user.email} kept failing: HTTP {answer.status_code}")
        user.take_cookies(answer)
        if not user.client_token or "__session" not in user.cookies:
            raise SetupFailed(f"sign-in of {user.email} set no session")
        user.token_issued = self.now
        client = await pool.request(
            "GET", FRONTEND, {"cookie": user.frontend_cookies(), "accept": "application/json"}
        )
        body = client.json()["response"]
        user.session_id = body["last_active_session_id"]
        user.user_id = next(s["user_id"] for s in body["sessions"] if s["id"] == user.session_id)

    async def keep_fresh(self, user: User) -> None:
        """The tab's token refresh every `--refresh-seconds`, as app/static/sandbox_clerk.js does."""
        due = user.token_issued + self.args.refresh_seconds
        while True:
            await self._until(due)
            if self.stopping:
                return
            self._spawn(self.refresh(user, due))
            due += self.args.refresh_seconds

    async def refresh(self, user: User, due: float) -> None:
        response = await self._request(
            "refresh",
            due,
            self.browser(user),
            "POST",
            f"{FRONTEND}/sessions/{user.session_id}/tokens",
            {"cookie": user.frontend_cookies(), "origin": self.app.url, "accept": "application/json"},
        )
        if response is not None and response.status_code == 200:
            user.take_cookies(response)
            user.token_issued = self.now

    # ---- streams ---------------------------------------------------------------------------------------

    async def start_stream(self, user: User, due: float, *, setup: bool = False) -> bool:
        """Ticket then claim, as the studio and the worker do; True once the stream runs."""
        await self._until(due)
        if self.stopping:
            return False
        response = await self._request(
            "ticket",
            due,
            self.browser(user),
            "POST",
            "/api/stream/ticket",
            {
                "cookie": user.app_cookies(),
                "x-csrftoken": user.cookies.get("stylecast_csrf", ""),
                "origin": self.app.url,
                "accept": "application/json",
            },
        )
        if response is None or response.status_code != 200:
            if setup:
                self.setup_errors[f"ticket {response.status_code if response else 'transport'}"] += 1
            return False
        ticket = verify_ticket(self.secret, response.json()["ticket"])
        claimed = self.now
        claim = StreamClaim(
            stream_id=ticket.stream_id,
            user_id=ticket.user_id,
            worker_id=WORKER_ID,
            ticket_id=ticket.ticket_id,
            sent_at=time.time(),
        )
        body, headers = encode_signed(self.secret, Purpose.CLAIM, claim)
        answer = await self._request(
            "claim", claimed, self.worker, "POST", "/api/stream/claim", headers, body
        )
        if answer is None or answer.status_code != 200:
            if setup:
                self.setup_errors[f"claim {answer.status_code if answer else 'transport'}"] += 1
            return False
        length = self.random.expovariate(1 / self.args.mean_stream_seconds)
        stream = Stream(
            user=user,
            stream_id=ticket.stream_id,
            ticket_id=ticket.ticket_id,
            allowance=ticket.allowance_seconds,
            claimed_wall=time.time(),
            ends=self.now + length,
        )
        self.streams.add(stream)
        self._spawn(self.run_stream(stream), self.loops)
        return True

    async def run_stream(self, stream: Stream) -> None:
        """The tab's meter polls and the worker's reports until the stream ends, then its final report and
        a new stream for the user who has waited longest."""
        poll_due = self.now + self.random.uniform(0, self.args.poll_seconds)
        report_due = self.now + self.args.report_seconds
        while True:
            due = min(poll_due, report_due)
            if due >= stream.ends:
                break
            await self._until(due)
            if self.stopping:
                return
            if due == poll_due:
                self._spawn(self.poll_meter(stream.user, due))
                poll_due += self.args.poll_seconds
            else:
                self._spawn(self.report(stream, due, final=False))
                report_due += self.args.report_seconds
        await self._until(stream.ends)
        if self.stopping:
            return
        self.streams.discard(stream)
        self._spawn(self.end_stream(stream))
        self._spawn(self.replace(stream.ends))

    async def end_stream(self, stream: Stream) -> None:
        await self.report(stream, stream.ends, final=True)
        self.idle.append(stream.user)

    async def replace(self, due: float) -> None:
        """Keep N streams live: the user idle longest starts one (retried later if refused)."""
        while not self.stopping:
            if not self.idle:
                due = max(due, self.now) + 0.1
                await self._until(due)
                continue
            user = self.idle.popleft()
            if await self.start_stream(user, due):
                return
            self.idle.append(user)
            due = max(due, self.now) + RETRY_START_SECONDS

    async def poll_meter(self, user: User, due: float) -> None:
        await self._request(
            "meter",
            due,
            self.browser(user),
            "GET",
            "/partials/usage-meter",
            {
                "cookie": user.app_cookies(),
                "hx-request": "true",
                "hx-current-url": f"{self.app.url}/studio",
                "hx-target": "usage-meter",
                "hx-trigger": "usage-meter",
                "accept": "*/*",
            },
            check=_meter_shows_minutes,
        )

    async def report(self, stream: Stream, due: float, *, final: bool) -> None:
        seconds = min(stream.allowance, max(0, int(time.time() - stream.claimed_wall)))
        usage = UsageReport(
            stream_id=stream.stream_id,
            user_id=stream.user.user_id,
            worker_id=WORKER_ID,
            seconds=seconds,
            final=final,
            sent_at=time.time(),
        )
        body, headers = encode_usage_report(self.secret, usage)
        endpoint = "final" if final else "report"
        response = await self._request(endpoint, due, self.worker, "POST", "/api/usage/report", headers, body)
        if not final and response is not None and response.status_code == 200 and response.json()["durable"]:
            self.recorder.urgent_reports.append(due)

    # ---- the run ---------------------------------------------------------------------------------------

    async def setup(self) -> dict[str, Any]:
        args = self.args
        total_users = args.streams + args.spare_users
        self.users = [User(email=f"load-{index:05d}@bench.stylecast.test") for index in range(total_users)]
        limit = asyncio.Semaphore(args.setup_concurrency)

        async def signed_in(user: User) -> None:
            async with limit:
                await self.sign_in(user)
            self._spawn(self.keep_fresh(user), self.loops)

        began = self.now
        await asyncio.gather(*(signed_in(user) for user in self.users))
        signed = self.now
        print(f"signed in {total_users} users in {signed - began:.1f} s", flush=True)

        # The initial streams start evenly over --ramp-seconds (open loop, like every later start), so the
        # ramp adds a bounded write load instead of as many tickets as the app can take.
        step = args.ramp_seconds / args.streams
        first = self.now
        progress, succeeded = [0], [0]

        async def started(user: User, due: float) -> None:
            ok = await self.start_stream(user, due, setup=True)
            progress[0] += 1
            succeeded[0] += ok
            if progress[0] % 100 == 0:
                print(f"  {progress[0]} streams started ({self.now - signed:.0f} s)", flush=True)
            if not ok:
                self.idle.append(user)
                self._spawn(self.replace(self.now + RETRY_START_SECONDS), self.loops)

        self.idle.extend(self.users[args.streams :])
        starts = [
            asyncio.ensure_future(started(user, first + index * step))
            for index, user in enumerate(self.users[: args.streams])
        ]
        _, late = await asyncio.wait(starts, timeout=args.ramp_seconds + args.setup_grace)
        ready = self.now
        complete = not late and succeeded[0] == args.streams
        if late:
            # The app could not start them in time: measure what it carries, and say so.
            for task in late:
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
        print(
            f"{succeeded[0]} of {args.streams} streams started {ready - signed:.1f} s after sign-in"
            + ("" if complete else " (setup incomplete)"),
            flush=True,
        )
        return {
            "users": total_users,
            "sign_in_s": round(signed - began, 2),
            "ramp_s": args.ramp_seconds,
            "streams_start_s": round(ready - signed, 2),
            "streams_started": succeeded[0],
            "live_streams_after_setup": len(self.streams),
            "complete": complete,
            "errors": dict(self.setup_errors),
        }

    async def stop(self, drain_seconds: float) -> None:
        self.stopping = True
        for task in list(self.loops):
            task.cancel()
        if self.loops:
            await asyncio.wait(list(self.loops))
        if self.inflight:
            _, late = await asyncio.wait(list(self.inflight), timeout=drain_seconds)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self.worker.close()
        for user in self.users:
            if user.pool is not None:
                user.pool.close()


# ---- Clerk requests, from the app's access log ---------------------------------------------------------


def clerk_requests(log: bytes, seconds: float) -> dict[str, Any]:
    """The Clerk emulator's requests in a slice of the app's log (uvicorn's access lines)."""
    backend: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    frontend = 0
    access_lines = 0
    for match in _ACCESS_LINE.finditer(log):
        access_lines += 1
        method, path, status = (part.decode() for part in match.groups())
        if not path.startswith("/sandbox/clerk/v1/"):
            continue
        if path.startswith(FRONTEND):
            frontend += 1
            continue
        kind = re.sub(r"/(user|sess)_[A-Za-z0-9]+", r"/{\1_id}", path.removeprefix("/sandbox/clerk/v1"))
        backend[f"{method} {kind}"] += 1
        statuses[status] += 1
    if access_lines == 0:
        return {"observable": False, "why": "no access log at this LOG_LEVEL; run at INFO to count"}
    total = sum(backend.values())
    return {
        "observable": True,
        "backend_requests": total,
        "backend_per_10s": round(total / seconds * 10, 1),
        "backend_by_kind": dict(backend.most_common()),
        "backend_statuses": dict(statuses),
        "backend_429": statuses.get("429", 0),
        "frontend_requests": frontend,
    }


def app_log_problems(log: bytes, limit: int = 10) -> dict[str, Any]:
    lines = [
        line for line in log.decode(errors="replace").splitlines() if " WARNING " in line or " ERROR " in line
    ]
    return {"warnings_and_errors": len(lines), "first": lines[:limit]}


# ---- profiling -----------------------------------------------------------------------------------------


def start_profiler(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit(
            "--py-spy needs py-spy on PATH: uv run --with py-spy --group test python -m bench.app_load"
        )
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(math.ceil(seconds)), "--rate", "100"]
    command += ["--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize_profile(path: Path, top: int = 30) -> dict[str, Any]:
    """Self and inclusive shares of the sampled frames (py-spy's collapsed stacks)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r" \(/.*/site-packages/", " (", frame) for frame in stack.split(";")[1:]]
        frames = [frame.replace(f"{ROOT}/", "") for frame in frames]
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = {"samples": total}
    share["self"] = {frame: round(100 * n / total, 1) for frame, n in own.most_common(top)} if total else {}
    share["inclusive"] = (
        {frame: round(100 * n / total, 1) for frame, n in inclusive.most_common(top)} if total else {}
    )
    return share


# ---- report --------------------------------------------------------------------------------------------


def format_table(endpoints: dict[str, dict[str, Any]]) -> list[str]:
    def cell(value: Any, width: int) -> str:
        return f"{'-' if value is None else value:>{width}}"

    header = (
        f"{'endpoint':9s} {'sched/s':>8s} {'done/s':>8s} {'count':>7s} {'errors':>6s} "
        f"{'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'lag99':>6s}  what"
    )
    lines = [header, "-" * len(header)]
    for name, label in ENDPOINTS.items():
        row = endpoints[name]
        lines.append(
            f"{name:9s} {cell(row['scheduled_per_s'], 8)} {cell(row['achieved_per_s'], 8)} "
            f"{row['count']:>7d} "
            f"{row['errors']:>6d} {cell(row['p50_ms'], 8)} {cell(row['p95_ms'], 8)} {cell(row['p99_ms'], 8)} "
            f"{cell(row['max_ms'], 8)} {cell(row['send_lag_p99_ms'], 6)}  {label}"
        )
    return lines


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "httptools": httptools.__version__,
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
        )
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        info["git_commit"] = commit.stdout.strip()
        info["git_tracked_changes"] = bool(changes.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_model(args: argparse.Namespace) -> dict[str, float]:
    """What the schedule asks for per second at N streams, before any measurement."""
    streams, users = args.streams, args.streams + args.spare_users
    starts = streams / args.mean_stream_seconds
    return {
        "report": round(streams / args.report_seconds, 2),
        "meter": round(streams / args.poll_seconds, 2),
        "ticket": round(starts, 3),
        "claim": round(starts, 3),
        "final": round(starts, 3),
        "refresh": round(users / args.refresh_seconds, 2),
    }


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    env = {"FREE_PLAN_SECONDS": str(args.free_plan_seconds)}
    if args.log_level:
        env["LOG_LEVEL"] = args.log_level
    app = AppUnderTest.start(workdir, env)
    run = LoadRun(args, app, app.stream_secret())
    profiler: subprocess.Popen[bytes] | None = None
    try:
        setup = await run.setup()
        print(f"warming up for {args.warmup:.0f} s, then measuring {args.seconds:.0f} s", flush=True)
        await asyncio.sleep(args.warmup)
        log_start = app.log_size()
        if args.py_spy:
            profiler = start_profiler(app.process.pid, args.seconds, Path(args.py_spy))
        start, before = run.now, CpuSnapshot.take(app.process.pid)
        await asyncio.sleep(args.seconds)
        end, after = run.now, CpuSnapshot.take(app.process.pid)
        live_at_end = len(run.streams)
        await run.stop(args.drain_seconds)
        await asyncio.sleep(0.5)  # the app's queued log records reach the file
        log = app.log_slice(log_start, app.log_size())
    finally:
        if not run.stopping:
            await run.stop(0)
        app.stop()
    if profiler is not None:
        _, stderr = profiler.communicate(timeout=60)
        if profiler.returncode != 0:
            print(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}", file=sys.stderr)

    seconds = end - start
    endpoints = {name: summarize(run.recorder.samples[name], start, end) for name in ENDPOINTS}
    urgent = sum(1 for due in run.recorder.urgent_reports if start <= due < end)
    budgeted = [sample for name in BUDGETED for sample in run.recorder.samples[name]]
    combined = summarize(budgeted, start, end)
    meets = setup["complete"] and all(
        endpoints[name]["errors"] == 0
        and endpoints[name]["p99_ms"] is not None
        and endpoints[name]["p99_ms"] <= TARGET_P99_MS
        for name in BUDGETED
        if endpoints[name]["count"]
    )
    record: dict[str, Any] = {
        "kind": "app_load",
        "started": None,
        "argv": sys.argv[1:],
        "environment": environment(),
        "config": {
            "streams": args.streams,
            "users": args.streams + args.spare_users,
            "spare_users": args.spare_users,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "ramp_s": args.ramp_seconds,
            "mean_stream_seconds": args.mean_stream_seconds,
            "report_seconds": args.report_seconds,
            "poll_seconds": args.poll_seconds,
            "refresh_seconds": args.refresh_seconds,
            "connections": args.connections,
            "app_log_level": args.log_level or "INFO (the app's default)",
            "free_plan_seconds": args.free_plan_seconds,
            "seed": args.seed,
            "profiled": bool(args.py_spy),
        },
        "scheduled_per_s": load_model(args),
        "setup": setup,
        "window_s": round(seconds, 2),
        "live_streams_at_end": live_at_end,
        "endpoints": endpoints,
        "stream_load": {
            "endpoints": list(BUDGETED),
            **{key: combined[key] for key in ("count", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms")},
            "target_p99_ms": TARGET_P99_MS,
            "meets_target": meets,
        },
        "running_reports_sent_to_clerk": urgent,
        "cpu": cpu_between(before, after),
        "clerk": clerk_requests(log, seconds),
        "app_log": app_log_problems(log),
    }
    if args.py_spy:
        record["profile"] = {"path": args.py_spy, **summarize_profile(Path(args.py_spy))}
    return record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.app_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured steady state (default 60)")
    parser.add_argument(
        "--warmup", type=float, default=25.0, help="steady state before measuring (default 25)"
    )
    parser.add_argument(
        "--spare-users", type=int, default=None, help="users beyond one per stream (default 5%%, at least 2)"
    )
    parser.add_argument("--mean-stream-seconds", type=float, default=300.0, help="mean stream length")
    parser.add_argument("--report-seconds", type=float, default=5.0, help="usage report interval")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="meter poll interval")
    parser.add_argument("--refresh-seconds", type=float, default=50.0, help="session token refresh interval")
    parser.add_argument("--connections", type=int, default=256, help="the generator's connection pool")
    parser.add_argument("--setup-concurrency", type=int, default=16, help="sign-ins at once")
    parser.add_argument(
        "--ramp-seconds", type=float, default=None, help="start the streams over this long (default N/8 s)"
    )
    parser.add_argument(
        "--setup-grace", type=float, default=60.0, help="after the ramp, wait this long for the last starts"
    )
    parser.add_argument("--log-level", default=None, help="the app's LOG_LEVEL (default: the app's, INFO)")
    parser.add_argument(
        "--free-plan-seconds", type=int, default=10_000_000, help="FREE_PLAN_SECONDS: no stream runs out"
    )
    parser.add_argument("--drain-seconds", type=float, default=10.0, help="wait for answers after the window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--py-spy", default=None, metavar="FILE", help="profile the app into FILE (raw stacks)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep the app's state and log here (a new folder) instead of a temporary one",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON record")
    args = parser.parse_args(argv)
    if args.ramp_seconds is None:
        args.ramp_seconds = args.streams / 8
    if args.spare_users is None:
        args.spare_users = max(2, math.ceil(args.streams * 0.05))
    if args.streams < 1 or args.spare_users < 1:
        parser.error("--streams and --spare-users must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = datetime.now(UTC)
    print(f"machine load average before: {load_average()}", flush=True)
    runner: Callable[..., Any] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run  # the generator's own overhead, kept low: it shares the machine with the app
    except ImportError:
        pass
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=False)
        record = runner(measure(args, Path(args.workdir)))
    else:
        with tempfile.TemporaryDirectory(prefix="stylecast-app-load-") as workdir:
            record = runner(measure(args, Path(workdir)))
    record["started"] = started.isoformat(timespec="seconds")
    record["table"] = format_table(record["endpoints"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started:%Y%m%dT%H%M%S}-app-load-{args.streams}-streams.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    record["path"] = str(path)

    print()
    print("\n".join(record["table"]))
    load = record["stream_load"]
    cpu = record["cpu"]
    clerk = record["clerk"]
    print(
        f"\nstream load ({', '.join(BUDGETED)}): p99 {load['p99_ms']} ms, {load['errors']} errors "
        f"-> target p99 <= {TARGET_P99_MS:.0f} ms {'met' if load['meets_target'] else 'NOT met'}"
    )
    print(
        f"CPU (cores of {cpu['cores']}): app {cpu['app_cores']}, generator {cpu['generator_cores']}, "
        f"other {cpu['other_cores']}; "
        f"load average {cpu['load_average_before']} -> {cpu['load_average_after']}"
    )
    if clerk["observable"]:
        print(
            f"Clerk Backend API: {clerk['backend_requests']} requests ({clerk['backend_per_10s']} per 10 s), "
            f"{clerk['backend_429']} answered 429; running reports sent to Clerk: "
            f"{record['running_reports_sent_to_clerk']}"
        )
    else:
        print(f"Clerk Backend API: not counted ({clerk['why']})")
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
