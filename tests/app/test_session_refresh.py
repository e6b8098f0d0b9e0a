"""Sessions as Clerk issues them: 60-second tokens, the refresh step for a returning browser, session tokens
only (never machine tokens), our issuer and an expiry required, ended sessions refused, deleted users
signed out, and no error logged for a request without a session.

In-process through Litestar's test client where no Clerk call is involved; on a real socket (the app with
its emulators, the SDK over HTTP) where one is.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar import Litestar
from litestar.testing import TestClient

from app.auth import (
    CLIENT_UAT_COOKIE,
    SESSION_COOKIE,
    VerifiedTokens,
    mint_sandbox_session_token,
    sandbox_issuer,
)
from app.factory import create_app
from app.settings import SANDBOX_CLERK_PREFIX, Settings, load_settings
from sandbox.clerk_emulator import ClerkEmulator
from tests.app.test_settings import live_environment
from tests.conftest import AppProcess
from tests.live_server import free_port, serve
from tests.stack import Stack, running_stack

PAGE = {"accept": "text/html,application/xhtml+xml", "sec-fetch-dest": "document"}
HTMX = {"HX-Request": "true"}
FRONTEND = f"{SANDBOX_CLERK_PREFIX}/client"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({}, state_dir=tmp_path, dotenv=None)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient[Litestar]]:
    with TestClient(create_app(settings), base_url=settings.app_url) as test_client:
        yield test_client


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as running:
        yield running


def forge(settings: Settings, drop: tuple[str, ...] = (), **claims: Any) -> str:
    """A token signed with the sandbox key (so only its claims can be wrong): a valid session token's
    claims, with `claims` overriding and `drop` removed."""
    now = int(time.time())
    body: dict[str, Any] = {
        "sub": "user_forged",
        "sid": "sess_forged",
        "azp": settings.app_url,
        "iss": sandbox_issuer(settings),
        "iat": now,
        "nbf": now - 10,
        "exp": now + 60,
        "v": 2,
    }
    body.update(claims)
    for name in drop:
        body.pop(name)
    assert settings.sandbox_jwt_private_key is not None
    return jwt.encode(body, settings.sandbox_jwt_private_key, algorithm="RS256", headers={"kid": "sandbox"})


def studio_with(client: TestClient[Litestar], token: str, **headers: str) -> httpx.Response:
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, token)
    return client.get("/studio", headers=headers, follow_redirects=False)


def expired(settings: Settings) -> str:
    return mint_sandbox_session_token(settings, "user_returning", now=time.time() - 600)


# ---- only session tokens of this Clerk instance, with an expiry ------------------------------------------


class ConnectionRecorder:
    """A TCP listener that records the first line of every connection made to it (an HTTPS proxy's view
    of a client: `CONNECT api.clerk.com:443 ...`) and hangs up."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    self.lines.append(connection.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
                except OSError:
                    self.lines.append("")

    def close(self) -> None:
        self._server.close()


def test_machine_token_cookies_sign_nobody_in_and_never_reach_clerk(
    start_app: Callable[..., AppProcess],
) -> None:
    # Every HTTPS request the app makes goes to the recorder: the SDK verifies an API key, OAuth or M2M
    # token by posting it to api.clerk.com, which would show up here as a CONNECT.
    recorder = ConnectionRecorder()
    proxy = f"http://127.0.0.1:{recorder.port}"
    try:
        app = start_app(
            HTTPS_PROXY=proxy, https_proxy=proxy, HTTP_PROXY="", http_proxy="", ALL_PROXY="", all_proxy=""
        )
        for token in ("ak_x", "oat_x", "mt_x", "m2m_x"):
            with httpx.Client(base_url=app.url, cookies={SESSION_COOKIE: token}, timeout=10) as browser:
                page = browser.get("/studio", follow_redirects=False)
                assert page.status_code in (302, 303), token
                assert page.headers["location"] == "/sign-in?next=/studio"
                api = browser.post("/api/stream/ticket")
                assert api.status_code == 401, token
                assert api.json()["error"] == "unauthenticated"
        assert recorder.lines == []
    finally:
        recorder.close()


def test_machine_token_prefixes_are_signed_out_in_process(
    client: TestClient[Litestar], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same, in this process: the SDK's HTTP client takes its proxy from the environment when it is
    # made, so any attempt to reach api.clerk.com would land on the recorder.
    recorder = ConnectionRecorder()
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{recorder.port}")
    try:
        for token in ("ak_live_abc", "oat_abc", "mt_abc", "m2m_abc"):
            assert studio_with(client, token).headers["location"] == "/sign-in?next=/studio"
            client.cookies.set(CLIENT_UAT_COOKIE, "1700000000")
            # Not "expired": such a cookie is no session at all, so there is nothing to refresh either.
            assert client.get("/account", headers=PAGE, follow_redirects=False).status_code == 302
        assert recorder.lines == []
    finally:
        recorder.close()
    # The same request with a real session token is signed in: the refusal is about the token type.
    assert studio_with(client, forge(settings)).status_code == 200


def test_a_token_without_an_expiry_is_refused(client: TestClient[Litestar], settings: Settings) -> None:
    assert studio_with(client, forge(settings, drop=("exp",))).headers["location"] == "/sign-in?next=/studio"
    assert studio_with(client, forge(settings)).status_code == 200


def test_a_token_from_another_issuer_is_refused(client: TestClient[Litestar], settings: Settings) -> None:
    foreign = forge(settings, iss="https://evil-instance.clerk.accounts.dev")
    assert studio_with(client, foreign).headers["location"] == "/sign-in?next=/studio"
    assert studio_with(client, forge(settings, drop=("iss",))).headers["location"] == "/sign-in?next=/studio"
    assert studio_with(client, forge(settings, drop=("sid",))).headers["location"] == "/sign-in?next=/studio"
    assert studio_with(client, forge(settings)).status_code == 200


def test_live_mode_wants_its_frontend_api_as_issuer(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    live = load_settings(
        {**live_environment(), "CLERK_JWT_KEY": public.decode()}, state_dir=tmp_path, dotenv=None
    )

    def token(issuer: str) -> str:
        now = int(time.time())
        claims = {"sub": "user_1", "sid": "sess_1", "azp": live.app_url, "iss": issuer, "iat": now}
        return jwt.encode({**claims, "nbf": now - 5, "exp": now + 60, "v": 2}, key, algorithm="RS256")

    with TestClient(create_app(live), base_url=live.app_url) as browser:
        assert studio_with(browser, token("https://brave-otter-12.clerk.accounts.dev")).status_code == 200
        refused = studio_with(browser, token("https://other-instance.clerk.accounts.dev"))
        assert refused.headers["location"] == "/sign-in?next=/studio"


# ---- the refresh step: a returning browser is not treated as signed out -----------------------------------


def test_an_expired_token_of_a_signed_in_client_gets_the_refresh_page(
    client: TestClient[Litestar], settings: Settings
) -> None:
    client.cookies.set(SESSION_COOKIE, expired(settings))
    client.cookies.set(CLIENT_UAT_COOKIE, str(int(time.time()) - 600))
    for path in ("/account", "/studio", "/account?id=hp_1&state=succeeded"):
        answer = client.get(path, headers=PAGE, follow_redirects=False)
        assert answer.status_code == 401
        assert "location" not in answer.headers
        assert answer.headers["cache-control"] == "no-store"
        assert 'data-testid="session-refresh"' in answer.text
        assert '<script src="/static/sandbox_clerk.js" type="module"></script>' in answer.text
        marker = re.search(r'data-session-refresh="([^"]+)"', answer.text)
        assert marker is not None
        assert marker.group(1) == f"/sign-in?next={quote(path, safe='/')}"


def test_a_missing_token_of_a_signed_in_client_gets_the_refresh_page(client: TestClient[Litestar]) -> None:
    # The browser was closed: its session cookie went with it, the client cookie did not.
    client.cookies.set(CLIENT_UAT_COOKIE, str(int(time.time()) - 3600))
    answer = client.get("/account", headers=PAGE, follow_redirects=False)
    assert answer.status_code == 401
    assert 'data-testid="session-refresh"' in answer.text


def test_a_signed_out_client_goes_straight_to_sign_in(
    client: TestClient[Litestar], settings: Settings
) -> None:
    client.cookies.set(SESSION_COOKIE, expired(settings))
    assert client.get("/account", headers=PAGE, follow_redirects=False).headers["location"] == (
        "/sign-in?next=/account"
    )
    client.cookies.set(CLIENT_UAT_COOKIE, "0")
    assert client.get("/account", headers=PAGE, follow_redirects=False).headers["location"] == (
        "/sign-in?next=/account"
    )


def test_scripts_get_a_bare_401_and_never_a_redirect(
    client: TestClient[Litestar], settings: Settings
) -> None:
    client.cookies.set(SESSION_COOKIE, expired(settings))
    client.cookies.set(CLIENT_UAT_COOKIE, str(int(time.time()) - 600))
    for path in ("/partials/usage-meter", "/studio"):
        answer = client.get(path, headers=HTMX, follow_redirects=False)
        assert answer.status_code == 401
        assert "hx-redirect" not in answer.headers
        assert "location" not in answer.headers
        assert 'data-testid="session-refresh"' not in answer.text
    api = client.post("/api/stream/ticket", headers={"accept": "application/json"})
    assert api.status_code == 401
    assert api.json()["error"] == "unauthenticated"


def test_a_token_that_was_accepted_stops_working_when_it_expires(
    client: TestClient[Litestar], settings: Settings
) -> None:
    expires = int(time.time()) + 1
    client.cookies.set(SESSION_COOKIE, forge(settings, exp=expires))
    for _ in range(3):  # the same token on every poll of its life
        assert client.get("/partials/usage-meter", headers=HTMX).status_code == 200
    # Clerk's SDK allows 5 s of clock skew past `exp`; after that the token no longer counts.
    time.sleep(max(0.0, expires + 5.5 - time.time()))
    assert client.get("/partials/usage-meter", headers=HTMX).status_code == 401


def test_an_accepted_token_with_its_signature_changed_is_refused(
    client: TestClient[Litestar], settings: Settings
) -> None:
    token = forge(settings)
    client.cookies.set(SESSION_COOKIE, token)
    assert client.get("/partials/usage-meter", headers=HTMX).status_code == 200
    head, body, signature = token.split(".")
    client.cookies.set(SESSION_COOKIE, f"{head}.{body}.{signature[:-4]}AAAA")
    assert client.get("/partials/usage-meter", headers=HTMX).status_code == 401
    other_user = forge(settings, sub="user_other")
    client.cookies.set(SESSION_COOKIE, f"{head}.{other_user.split('.')[1]}.{signature}")
    assert client.get("/partials/usage-meter", headers=HTMX).status_code == 401


def test_verified_tokens_forget_expired_ones_first_and_never_grow_past_capacity() -> None:
    now = [1000.0]
    memo = VerifiedTokens(capacity=3, clock=lambda: now[0])
    memo.add("expired-soon", {"exp": 1001})
    memo.add("a", {"exp": 2000})
    memo.add("b", {"exp": 2000})
    now[0] = 1500.0
    assert memo.get("expired-soon") is None
    memo.add("c", {"exp": 2000})
    memo.add("d", {"exp": 2000})  # full of live tokens: the oldest goes
    assert len(memo) == 3
    assert memo.get("a") is None
    assert [memo.get(key) for key in ("b", "c", "d")] == [{"exp": 2000}] * 3


def test_the_refresh_page_gives_up_after_three_tries(
    client: TestClient[Litestar], settings: Settings
) -> None:
    client.cookies.set(SESSION_COOKIE, expired(settings))
    client.cookies.set(CLIENT_UAT_COOKIE, str(int(time.time()) - 600))
    answers = [client.get("/account", headers=PAGE, follow_redirects=False) for _ in range(4)]
    assert [answer.status_code for answer in answers[:3]] == [401, 401, 401]
    assert answers[3].headers["location"] == "/sign-in?next=/account"


def test_a_token_older_than_the_clients_last_sign_in_is_refreshed(
    client: TestClient[Litestar], settings: Settings
) -> None:
    # The browser signed in again (another tab) after this token was issued.
    client.cookies.set(SESSION_COOKIE, mint_sandbox_session_token(settings, "user_a", now=time.time() - 30))
    client.cookies.set(CLIENT_UAT_COOKIE, str(int(time.time())))
    assert 'data-testid="session-refresh"' in client.get("/account", headers=PAGE).text
    # A script's request with that still-valid token is served.
    assert client.get("/studio", headers=HTMX).status_code == 200


def test_live_refresh_page_loads_clerkjs(tmp_path: Path) -> None:
    live = load_settings(live_environment(), state_dir=tmp_path, dotenv=None)
    with TestClient(create_app(live), base_url=live.app_url) as browser:
        browser.cookies.set(CLIENT_UAT_COOKIE, "1700000000")
        page = browser.get("/account", headers=PAGE, follow_redirects=False)
    assert page.status_code == 401
    fapi = "https://brave-otter-12.clerk.accounts.dev"
    assert f'src="{fapi}/npm/@clerk/ui@1/dist/ui.browser.js"' in page.text
    assert f'src="{fapi}/npm/@clerk/clerk-js@6/dist/clerk.browser.js"' in page.text
    assert '<script src="/static/clerk.js" type="module"></script>' in page.text


# ---- ended sessions and deleted users --------------------------------------------------------------------


def test_a_user_deleted_in_clerk_has_no_session_left(stack: Stack) -> None:
    browser = stack.sign_in("leaver@example.com")
    assert browser.client.get("/account").status_code == 200
    client_cookie = browser.client.cookies["__client"]
    stack.clerk.users.delete(user_id=browser.user_id)

    page = browser.client.get("/account", headers=PAGE)
    assert page.status_code == 401  # the refresh page: the browser's client is still marked signed in
    refresh = browser.client.post(
        f"{FRONTEND}/sessions/{jwt_sid(browser.session_token)}/tokens", headers={"Origin": stack.url}
    )
    assert refresh.status_code == 401
    assert browser.client.cookies[CLIENT_UAT_COOKIE] == "0"
    assert browser.client.get("/account").headers["location"] == "/sign-in?next=/account"
    assert browser.meter().status_code == 401
    assert browser.ticket().status_code == 401
    assert client_cookie  # the client cookie itself stays; it no longer has a session to refresh


def jwt_sid(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["sid"])


def test_a_session_for_a_missing_user_signs_the_browser_out(stack: Stack) -> None:
    # A token the emulator knows nothing against (so only the user's absence can refuse it): what a
    # browser holds in the minute after its user was deleted in live Clerk.
    token = mint_sandbox_session_token(stack.settings, "user_DeletedMomentsAgo")

    @contextmanager
    def browser() -> Iterator[httpx.Client]:
        with httpx.Client(base_url=stack.url, timeout=20) as client:
            client.get("/")  # the CSRF cookie, whose value the studio sends as its header
            client.cookies.set(SESSION_COOKIE, token)
            client.cookies.set(CLIENT_UAT_COOKIE, "1700000000")
            yield client

    with browser() as visitor:
        account = visitor.get("/account")
        assert account.status_code == 302
        assert account.headers["location"] == "/sign-in?next=/account"
        assert_signed_out(account)
    with browser() as visitor:
        meter = visitor.get("/partials/usage-meter", headers=HTMX)
        assert meter.status_code == 401
        assert_signed_out(meter)
    with browser() as visitor:
        ticket = visitor.post(
            "/api/stream/ticket", headers={"x-csrftoken": visitor.cookies["stylecast_csrf"]}
        )
        assert ticket.status_code == 401
        assert ticket.json()["error"] == "unauthenticated"
        assert_signed_out(ticket)


def assert_signed_out(answer: httpx.Response) -> None:
    cookies = answer.headers.get_list("set-cookie")
    assert any(c.startswith(f"{SESSION_COOKIE}=") and "Max-Age=0" in c for c in cookies), cookies
    assert any(c.startswith(f"{CLIENT_UAT_COOKIE}=0;") for c in cookies), cookies


def test_live_a_session_for_a_user_clerk_no_longer_has_signs_out(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    emulator = ClerkEmulator(tmp_path / "clerk.json", "sk_live_x", api_path=SANDBOX_CLERK_PREFIX)
    with serve(Litestar(route_handlers=[emulator.router])) as clerk_url:
        live = load_settings(
            {
                **live_environment(),
                "CLERK_JWT_KEY": public.decode(),
                "CLERK_API_URL": clerk_url + "/sandbox/clerk/v1",
            },
            state_dir=tmp_path,
            dotenv=None,
        )
        now = int(time.time())
        claims = {"sub": "user_gone", "sid": "sess_1", "azp": live.app_url, "iat": now, "nbf": now, "v": 2}
        token = jwt.encode(
            {**claims, "iss": "https://brave-otter-12.clerk.accounts.dev", "exp": now + 60},
            key,
            algorithm="RS256",
        )
        with TestClient(create_app(live), base_url=live.app_url) as browser:
            browser.cookies.set(SESSION_COOKIE, token)
            account = browser.get("/account", follow_redirects=False)
            assert account.headers["location"] == "/sign-in?next=/account"
            cleared = account.headers.get_list("set-cookie")
            assert any(c.startswith(f"{SESSION_COOKIE}=") and "Max-Age=0" in c for c in cleared), cleared
            browser.cookies.set(SESSION_COOKIE, token)
            meter = browser.get("/partials/usage-meter", headers=HTMX)
            assert meter.status_code == 401
            assert emulator.request_count >= 2  # Clerk was asked, and said the user does not exist


def test_sign_out_on_one_process_is_seen_by_another(tmp_path: Path) -> None:
    # Two app processes on one state directory behind one origin (here: both told APP_URL is the first).
    port = free_port()
    first = load_settings({}, port=port, state_dir=tmp_path, dotenv=None)
    second = load_settings({"APP_URL": first.app_url}, port=free_port(), state_dir=tmp_path, dotenv=None)
    with (
        serve(create_app(first), port) as first_url,
        serve(create_app(second), second.port) as second_url,
        httpx.Client(base_url=first_url, timeout=20) as browser,
    ):
        page = browser.get("/sign-in").text
        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page)
        assert csrf is not None
        browser.post("/sign-in", data={"email": "two@example.com", "_csrf_token": csrf.group(1)})
        cookies = dict(browser.cookies)
        old = {SESSION_COOKIE: cookies[SESSION_COOKIE], "__client": cookies["__client"]}
        elsewhere = httpx.Client(base_url=second_url, cookies=old, timeout=20)
        assert elsewhere.get("/studio").status_code == 200
        sid = jwt_sid(old[SESSION_COOKIE])
        refreshed = elsewhere.post(f"{FRONTEND}/sessions/{sid}/tokens", headers={"Origin": first.app_url})
        assert refreshed.status_code == 200  # the second process knows the first one's session

        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', browser.get("/studio").text)
        assert csrf is not None
        assert browser.post("/sign-out", data={"_csrf_token": csrf.group(1)}).status_code == 303

        replay = httpx.Client(base_url=second_url, cookies=old, timeout=20)
        assert replay.get("/studio", follow_redirects=False).headers["location"] == "/sign-in?next=/studio"
        again = replay.post(f"{FRONTEND}/sessions/{sid}/tokens", headers={"Origin": first.app_url})
        assert again.status_code == 401
        elsewhere.close()
        replay.close()


# ---- a request without a session is not an error ---------------------------------------------------------


def test_requests_without_a_session_log_no_error(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url, timeout=10) as visitor:
        for _ in range(3):
            assert visitor.get("/studio", follow_redirects=False).status_code == 302
            assert visitor.get("/account", follow_redirects=False).status_code == 302
            assert visitor.get("/partials/usage-meter", headers=HTMX).status_code == 401
            assert visitor.post("/api/stream/ticket").status_code == 401
        visitor.cookies.set(SESSION_COOKIE, "not-a-jwt")
        assert visitor.get("/studio", follow_redirects=False).status_code == 302
    time.sleep(0.5)  # let the log reach the file
    log = app.log()
    assert "Traceback" not in log
    assert not re.search(r"\bERROR\b", log)
    assert "SignInRequired" not in log
    # Each request is the one access line uvicorn writes for it.
    assert len(re.findall(r'"GET /studio HTTP/1\.1" 302', log)) == 4


def test_sign_in_required_is_not_logged_as_an_exception(
    client: TestClient[Litestar], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG"):
        assert client.get("/account", follow_redirects=False).status_code == 302
        assert client.post("/api/stream/ticket").status_code == 401
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
    assert not [record for record in caplog.records if record.exc_info]
