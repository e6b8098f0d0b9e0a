"""The whole app on a real socket, for tests of the ledger, sessions and headers: sandbox sign-in over HTTP,
the Clerk emulator read through the real SDK, signed worker reports, and a proxy in front of Clerk that can
fail on demand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import msgspec
from clerk_backend_api import Clerk
from litestar import Litestar

from app.auth import SESSION_COOKIE
from app.factory import create_app
from app.settings import SANDBOX_CLERK_PREFIX, Settings, load_settings
from billing.ledger_store import LedgerStore
from billing.metadata import BillingMetadata, decode_metadata, encode_metadata
from inference.protocol import StreamClaim, UsageReport
from inference.signing import Purpose, encode_signed
from inference.usage_reporter import encode_usage_report
from sandbox.clerk_emulator import ClerkEmulator
from tests.live_server import free_port, serve

CSRF_COOKIE = "stylecast_csrf"


@dataclass
class Browser:
    """A signed-in user's HTTP session, as the studio has it: session cookie plus the CSRF token."""

    client: httpx.Client
    user_id: str
    session_token: str
    csrf_token: str

    def ticket(self) -> httpx.Response:
        return self.client.post("/api/stream/ticket", headers={"x-csrftoken": self.csrf_token})

    def meter(self) -> httpx.Response:
        return self.client.get("/partials/usage-meter", headers={"HX-Request": "true"})


@dataclass
class Stack:
    url: str
    settings: Settings
    app: Litestar
    emulator: ClerkEmulator
    clerk: Clerk  # the synchronous SDK, used by the test thread only, straight at the emulator

    def sign_in(self, email: str) -> Browser:
        client = httpx.Client(base_url=self.url, timeout=30)
        client.get("/sign-in")
        csrf = client.cookies[CSRF_COOKIE]
        answer = client.post("/sign-in", data={"email": email, "_csrf_token": csrf}, follow_redirects=False)
        assert answer.status_code == 303, answer.text
        token = client.cookies[SESSION_COOKIE]
        user_id = jwt.decode(token, options={"verify_signature": False})["sub"]
        return Browser(client=client, user_id=user_id, session_token=token, csrf_token=csrf)

    def metadata(self, user_id: str) -> BillingMetadata:
        user = self.clerk.users.get(user_id=user_id)
        return decode_metadata(user.public_metadata, user.private_metadata)

    def set_metadata(self, user_id: str, metadata: BillingMetadata) -> None:
        public, private = encode_metadata(metadata)
        self.clerk.users.update_metadata(user_id=user_id, public_metadata=public, private_metadata=private)

    def report(self, usage: UsageReport, *, secret: str | None = None) -> httpx.Response:
        body, headers = encode_usage_report(secret or self.settings.stream_secret, usage)
        return httpx.post(f"{self.url}/api/usage/report", content=body, headers=headers, timeout=30)

    def claim(self, browser: Browser, stream_id: str, *, ticket_id: str = "t-test") -> httpx.Response:
        """The worker's signed claim of `stream_id`, as a worker sends it before its first frame."""
        claim = StreamClaim(
            stream_id=stream_id,
            user_id=browser.user_id,
            worker_id="test-gpu",
            ticket_id=ticket_id,
            sent_at=time.time(),
        )
        body, headers = encode_signed(self.settings.stream_secret, Purpose.CLAIM, claim)
        return httpx.post(f"{self.url}/api/stream/claim", content=body, headers=headers, timeout=30)


def usage(browser: Browser, stream_id: str, seconds: int, *, final: bool = False) -> UsageReport:
    return UsageReport(
        stream_id=stream_id,
        user_id=browser.user_id,
        worker_id="test-gpu",
        seconds=seconds,
        final=final,
        sent_at=0.0,
    )


@contextmanager
def running_stack(
    state_dir: Any, *, port: int | None = None, clerk_api_url: str | None = None, **env: str
) -> Iterator[Stack]:
    port = port or free_port()
    settings = load_settings(env, port=port, state_dir=state_dir, dotenv=None)
    if clerk_api_url is not None:
        settings = msgspec.structs.replace(settings, clerk_api_url=clerk_api_url)
    app = create_app(settings)
    emulator = app.state.clerk_emulator
    with serve(app, port) as url:
        # The app's own ledger store, writing a running stream's reports within half a second instead of
        # 20 s, so that tests see them reach Clerk without waiting.
        app.state.ledger = LedgerStore(app.state.accounts, app.state.catalogue, deferred_write_seconds=0.5)
        clerk = Clerk(
            bearer_auth=settings.clerk_secret_key, server_url=f"{settings.internal_url}{SANDBOX_CLERK_PREFIX}"
        )
        yield Stack(url=url, settings=settings, app=app, emulator=emulator, clerk=clerk)


class FlakyProxy:
    """An HTTP proxy in front of Clerk. `mode`: "up" forwards; "down" answers 503 without forwarding (an
    outage); "lost_answer" forwards writes, so Clerk applies them, then answers 503 (a timeout after the
    write landed, the case that double counts if anything does); reads still get their answer.
    `write_delay`: seconds every write waits before it is forwarded (a slow Clerk)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = "up"
        self.write_delay = 0.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.mode == "down":
            await _answer(send, 503, b'{"errors": []}')
            return
        if self.write_delay and scope["method"] != "GET":
            await asyncio.sleep(self.write_delay)
        query = scope.get("query_string", b"").decode()
        target = f"{self.upstream}{scope['path']}" + (f"?{query}" if query else "")
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.lower() not in (b"host",)]
        async with httpx.AsyncClient(timeout=30) as client:
            upstream = await client.request(scope["method"], target, headers=headers, content=body)
        if self.mode == "lost_answer" and scope["method"] != "GET":
            await _answer(send, 503, b'{"errors": []}')
            return
        await _answer(send, upstream.status_code, upstream.content)


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


@contextmanager
def stack_behind_flaky_clerk(state_dir: Any, **env: str) -> Iterator[tuple[Stack, FlakyProxy]]:
    """The app whose Clerk client goes through a FlakyProxy to its own emulator."""
    port = free_port()
    proxy = FlakyProxy(f"http://127.0.0.1:{port}")
    with (
        serve(proxy, lifespan="off") as proxy_url,
        running_stack(
            state_dir, port=port, clerk_api_url=f"{proxy_url}{SANDBOX_CLERK_PREFIX}", **env
        ) as stack,
    ):
        yield stack, proxy
