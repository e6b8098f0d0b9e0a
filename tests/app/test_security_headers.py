"""Security headers, caching and the OpenAPI schema, as a browser or a proxy sees them over HTTP.

Every response carries the headers, including the ones Litestar's router answers itself (unknown path,
wrong method), errors raised by middleware (CSRF) and unhandled exceptions; personal pages are never
stored by a shared cache; the live CSP lets ClerkJS's bot and fraud protection load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.factory import create_app
from app.security import content_security_policy
from app.settings import load_settings
from tests.app.test_settings import live_environment
from tests.live_server import free_port, serve
from tests.stack import Browser, FlakyProxy, Stack, _answer, running_stack

EXPECTED = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "strict-origin-when-cross-origin",
    "cross-origin-opener-policy": "same-origin",
}
PROTECT = "https://*.protect.clerk.com"


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in EXPECTED.items():
        assert response.headers.get(name) == value, (response.request.url, response.status_code, name)
    policy = directives(response.headers["content-security-policy"])
    assert policy["script-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert "camera=(self)" in response.headers["permissions-policy"]


def directives(policy: str) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        parsed[name] = sources
    return parsed


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("headers")) as running:
        yield running


@pytest.fixture(scope="module")
def signed_in(stack: Stack) -> Browser:
    return stack.sign_in("headers@example.com")


# Requests a stranger can send, and the status each must get: pages, router-level answers, middleware
# refusals, static files, machine endpoints.
ANONYMOUS = [
    ("GET", "/", {}, b"", 200),
    ("GET", "/no-such-page", {}, b"", 404),
    ("GET", "/api/no-such-endpoint", {}, b"", 404),
    ("DELETE", "/health", {}, b"", 405),
    ("PUT", "/api/usage/report", {}, b"", 405),
    (
        "POST",
        "/sign-in",
        {"content-type": "application/x-www-form-urlencoded"},
        b"email=a%40example.com",
        403,
    ),
    ("GET", "/static/app.css", {}, b"", 200),
    ("GET", "/static/no-such-file.js", {}, b"", 404),
    ("GET", "/account", {}, b"", 302),
    ("GET", "/partials/usage-meter", {"hx-request": "true"}, b"", 401),
    ("GET", "/sign-in", {}, b"", 200),
    # Refused as signed out (401) or for the forged token (403), whichever check comes first.
    ("POST", "/api/stream/ticket", {"x-csrftoken": "forged"}, b"", (401, 403)),
    ("POST", "/api/usage/report", {"content-type": "application/json"}, b"{}", 401),
    ("POST", "/api/usage/report", {"content-type": "application/json"}, b"x" * 100_000, 413),
    ("POST", "/api/webhooks/chargebee", {"content-type": "application/json"}, b"{}", 401),
    ("GET", "/sandbox/clerk/v1/users", {}, b"", 401),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    ANONYMOUS,
    ids=[f"{method} {path} {status}" for method, path, _, _, status in ANONYMOUS],
)
def test_every_response_carries_the_security_headers(
    stack: Stack, method: str, path: str, headers: dict[str, str], body: bytes, status: int | tuple[int, ...]
) -> None:
    response = httpx.request(method, f"{stack.url}{path}", headers=headers, content=body, timeout=30)
    assert response.status_code in (status if isinstance(status, tuple) else (status,)), response.text
    assert_security_headers(response)
    if not path.startswith("/static/"):
        assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "path", ["/account", "/studio", "/pricing", "/partials/usage-meter", "/partials/plan-cards"]
)
def test_personal_pages_and_partials_are_never_stored(signed_in: Browser, path: str) -> None:
    response = signed_in.client.get(path, headers={"HX-Request": "true"} if "partials" in path else {})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert_security_headers(response)


def test_a_stream_ticket_is_never_stored(signed_in: Browser) -> None:
    response = signed_in.ticket()
    assert response.status_code == 200, response.text
    assert "ticket" in response.json()
    assert response.headers["cache-control"] == "no-store"
    assert_security_headers(response)


def test_static_files_may_be_cached_but_are_revalidated(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/static/studio.js", timeout=30)
    assert response.status_code == 200
    # Stored, but checked with the server before each use: a deploy never leaves a stale studio.js.
    assert response.headers["cache-control"] == "no-cache"
    assert_security_headers(response)


class BrokenClerk(FlakyProxy):
    """A Clerk that answers 200 with a body the SDK cannot read, in mode "garbage": an unhandled error."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.mode == "garbage" and scope["type"] == "http":
            await _answer(send, 200, b'["not a user"]')
            return
        await super().__call__(scope, receive, send)


def test_server_errors_carry_the_security_headers(tmp_path: Path) -> None:
    port = free_port()
    clerk = BrokenClerk(f"http://127.0.0.1:{port}")
    with (
        serve(clerk, lifespan="off") as clerk_url,
        running_stack(tmp_path, port=port, clerk_api_url=f"{clerk_url}/sandbox/clerk/v1") as stack,
    ):
        browser = stack.sign_in("errors@example.com")
        clerk.mode = "down"  # Clerk answers 503: the app answers 503 itself
        unavailable = browser.client.get("/account")
        assert unavailable.status_code == 503
        assert unavailable.headers["cache-control"] == "no-store"
        assert_security_headers(unavailable)
        clerk.mode = "garbage"  # the SDK raises on the answer: Litestar's own 500
        broken = browser.ticket()
        assert broken.status_code >= 500
        assert_security_headers(broken)


# ---- the live Content-Security-Policy ---------------------------------------------------------------------


def test_live_csp_allows_clerk_protect_for_scripts_frames_and_connections(tmp_path: Path) -> None:
    live = load_settings(live_environment(), state_dir=tmp_path, dotenv=None)
    policy = directives(content_security_policy(live))
    assert PROTECT in policy["script-src"]
    assert PROTECT in policy["frame-src"]
    # Protect is served on ports other than 443, and a source without a port matches 443 only.
    assert f"{PROTECT}:*" in policy["connect-src"]
    # ...and next to what was there before, not instead of it.
    assert "https://brave-otter-12.clerk.accounts.dev" in policy["script-src"]
    assert "https://challenges.cloudflare.com" in policy["frame-src"]


def test_live_pages_are_served_with_the_clerk_protect_policy(tmp_path: Path) -> None:
    live = load_settings(live_environment(), port=free_port(), state_dir=tmp_path, dotenv=None)
    with serve(create_app(live), live.port) as url:
        response = httpx.get(f"{url}/sign-in", timeout=30)
    assert response.status_code == 200
    policy = directives(response.headers["content-security-policy"])
    assert PROTECT in policy["script-src"]
    assert PROTECT in policy["frame-src"]
    assert f"{PROTECT}:*" in policy["connect-src"]
    assert response.headers["strict-transport-security"].startswith("max-age=")


def test_sandbox_csp_allows_no_clerk_host(stack: Stack) -> None:
    policy = directives(httpx.get(f"{stack.url}/sign-in", timeout=30).headers["content-security-policy"])
    assert policy["frame-src"] == ["'none'"]
    assert not any("clerk" in source for sources in policy.values() for source in sources)


# ---- the OpenAPI schema -----------------------------------------------------------------------------------


def schema_status(environ: dict[str, str], state_dir: Path) -> dict[str, int]:
    settings = load_settings(environ, port=free_port(), state_dir=state_dir, dotenv=None)
    with serve(create_app(settings), settings.port) as url:
        return {
            path: httpx.get(f"{url}{path}", timeout=30).status_code
            for path in ("/schema", "/schema/openapi.json", "/schema/swagger")
        }


def test_live_mode_does_not_serve_the_openapi_schema(tmp_path: Path) -> None:
    assert set(schema_status(live_environment(), tmp_path).values()) == {404}


def test_live_mode_serves_the_schema_when_enabled(tmp_path: Path) -> None:
    served = schema_status({**live_environment(), "STYLECAST_OPENAPI": "1"}, tmp_path)
    assert served["/schema/openapi.json"] == 200


def test_sandbox_serves_the_schema_unless_disabled(tmp_path: Path) -> None:
    assert schema_status({}, tmp_path / "on")["/schema/openapi.json"] == 200
    assert set(schema_status({"STYLECAST_OPENAPI": "0"}, tmp_path / "off").values()) == {404}


def test_an_unreadable_openapi_switch_is_refused(tmp_path: Path) -> None:
    from app.settings import ConfigError

    with pytest.raises(ConfigError, match="STYLECAST_OPENAPI"):
        load_settings({"STYLECAST_OPENAPI": "maybe"}, state_dir=tmp_path, dotenv=None)
