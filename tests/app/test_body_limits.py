"""Request body limits on `python -m app`, over raw HTTP: a body larger than an endpoint can use is refused
with 413 before it is read.

"Before it is read" is tested by never sending it: the request announces a huge Content-Length, or streams
a chunked body without ending it, and the answer must come while the client is still holding the rest.
A server that buffers the body first would wait for bytes that never come.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from app.routes.chargebee_webhooks import WEBHOOK_MAX_BODY_BYTES
from app.security import MAX_REQUEST_BODY_BYTES
from app.settings import load_settings
from inference.protocol import UsageReport
from inference.signing import MAX_SIGNED_BODY_BYTES
from inference.usage_reporter import encode_usage_report
from tests.conftest import ROOT, AppProcess, clean_environment, stop_process, wait_until_healthy
from tests.live_server import free_port

ANSWER_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """`python -m app` in sandbox mode, one for the module (conftest's start_app is per test)."""
    state = tmp_path_factory.mktemp("limits")
    port = free_port()
    log_path = state.parent / f"app-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", str(port), "--state-dir", str(state)],
            cwd=tmp_path_factory.getbasetemp(),
            env=clean_environment(PYTHONPATH=str(ROOT)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    running = AppProcess(url=f"http://127.0.0.1:{port}", state_dir=state, process=process, log_path=log_path)
    try:
        wait_until_healthy(process, running.url, log_path, "python -m app")
        yield running
    finally:
        stop_process(process)


def open_request(url: str, method: str, path: str, headers: dict[str, str]) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection(
        (parts.hostname or "127.0.0.1", parts.port or 80), timeout=ANSWER_TIMEOUT_S
    )
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_status(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """The status and headers of the answer; socket.timeout if none comes within ANSWER_TIMEOUT_S."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


def announced_but_unsent(url: str, path: str, size: int, **headers: str) -> tuple[int, dict[str, str]]:
    """POST announcing `size` bytes and sending none of them."""
    with open_request(
        url, "POST", path, {"Content-Type": "application/json", "Content-Length": str(size), **headers}
    ) as sock:
        return read_status(sock)


def chunked_without_end(url: str, path: str, size: int, **headers: str) -> tuple[int, dict[str, str]]:
    """POST with no Content-Length: `size` bytes in 1 KiB chunks, and never the final empty chunk."""
    with open_request(
        url, "POST", path, {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **headers}
    ) as sock:
        chunk = b"x" * 1024
        sent = 0
        try:
            while sent < size:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: what we want
        return read_status(sock)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


# Every endpoint that takes a body, and what bigger than it can use means.
ENDPOINTS = [
    ("/api/usage/report", MAX_SIGNED_BODY_BYTES),
    ("/api/stream/claim", MAX_SIGNED_BODY_BYTES),
    ("/api/webhooks/chargebee", WEBHOOK_MAX_BODY_BYTES),
    ("/sandbox/clerk/v1/users", MAX_REQUEST_BODY_BYTES),
    ("/sandbox/chargebee/api/v2/customers", MAX_REQUEST_BODY_BYTES),
    ("/sign-in", MAX_REQUEST_BODY_BYTES),
]


@pytest.fixture(scope="module")
def credentials(app: AppProcess) -> dict[str, dict[str, str]]:
    """Headers that get each endpoint past its authentication, so only the size can refuse the body."""
    settings = load_settings({}, state_dir=app.state_dir, dotenv=None)
    browser = httpx.get(f"{app.url}/sign-in", timeout=30)
    csrf = browser.cookies["stylecast_csrf"]
    return {
        # The worker's requests are authenticated by a signature over the body, so the size comes first.
        "/api/usage/report": {},
        "/api/stream/claim": {},
        "/api/webhooks/chargebee": {
            "Authorization": basic(settings.chargebee_webhook_username, settings.chargebee_webhook_password)
        },
        "/sandbox/clerk/v1/users": {"Authorization": f"Bearer {settings.clerk_secret_key}"},
        "/sandbox/chargebee/api/v2/customers": {"Authorization": basic(settings.chargebee_api_key, "")},
        "/sign-in": {"Cookie": f"stylecast_csrf={csrf}", "X-CSRFToken": csrf},
    }


@pytest.mark.parametrize(("path", "limit"), ENDPOINTS)
def test_an_announced_oversized_body_is_refused_before_it_is_sent(
    app: AppProcess, credentials: dict[str, dict[str, str]], path: str, limit: int
) -> None:
    # A 9 MB upload announced: the answer must not wait for a single byte of it.
    status, headers = announced_but_unsent(app.url, path, 9_000_000, **credentials[path])
    assert status == 413
    assert headers["x-content-type-options"] == "nosniff"
    assert announced_but_unsent(app.url, path, limit + 1, **credentials[path])[0] == 413


@pytest.mark.parametrize(("path", "limit"), ENDPOINTS)
def test_a_chunked_oversized_body_is_refused_as_it_arrives(
    app: AppProcess, credentials: dict[str, dict[str, str]], path: str, limit: int
) -> None:
    status, _ = chunked_without_end(app.url, path, limit + 2048, **credentials[path])
    assert status == 413


@pytest.mark.parametrize(("path", "limit"), ENDPOINTS)
def test_without_credentials_a_huge_body_is_not_read_either(app: AppProcess, path: str, limit: int) -> None:
    # Refused for its size or for its missing credentials, but answered without the body.
    status, _ = announced_but_unsent(app.url, path, 9_000_000)
    assert status in (401, 403, 413)


def test_many_oversized_usage_posts_are_answered_at_once(app: AppProcess) -> None:
    # Thirty 9 MB unsigned reports were 290 MB of memory; now each is one quick 413.
    started = time.monotonic()
    statuses = [announced_but_unsent(app.url, "/api/usage/report", 9_000_000)[0] for _ in range(30)]
    assert statuses == [413] * 30
    assert time.monotonic() - started < ANSWER_TIMEOUT_S
    assert httpx.get(f"{app.url}/health", timeout=10).status_code == 200


def test_a_real_usage_report_of_the_largest_plausible_size_still_gets_through(app: AppProcess) -> None:
    settings = load_settings({}, state_dir=app.state_dir, dotenv=None)
    report = UsageReport(
        stream_id="s" * 64,
        user_id="user_" + "u" * 60,
        worker_id="w" * 253,
        seconds=86_400,
        final=True,
        sent_at=time.time(),
    )
    body, headers = encode_usage_report(settings.stream_secret, report)
    assert len(body) < MAX_SIGNED_BODY_BYTES
    answer = httpx.post(f"{app.url}/api/usage/report", content=body, headers=headers, timeout=30)
    # Past the limit and the signature: refused only because no such user exists.
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_user"


def test_a_large_webhook_event_within_the_limit_is_read(app: AppProcess) -> None:
    settings = load_settings({}, state_dir=app.state_dir, dotenv=None)
    auth = basic(settings.chargebee_webhook_username, settings.chargebee_webhook_password)
    # A body of 900 KiB that is not an event: read in full and judged (400), not refused for its size.
    body = b'{"padding": "' + b"x" * (900 * 1024) + b'"}'
    answer = httpx.post(
        f"{app.url}/api/webhooks/chargebee",
        content=body,
        headers={"Authorization": auth, "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400
    assert answer.json()["result"] == "malformed"
    # Authenticated or not, more than the limit is not read.
    assert (
        announced_but_unsent(
            app.url, "/api/webhooks/chargebee", WEBHOOK_MAX_BODY_BYTES + 1, Authorization=auth
        )[0]
        == 413
    )
