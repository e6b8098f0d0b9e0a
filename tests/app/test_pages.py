"""The pages, the guard and the security basics, through Litestar's test client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from app.auth import SESSION_COOKIE, mint_sandbox_session_token
from app.factory import create_app
from app.settings import Settings, load_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({}, state_dir=tmp_path, dotenv=None)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url=settings.app_url) as test_client:
        yield test_client


def signed_in(client: TestClient, settings: Settings, user_id: str = "user_test123") -> TestClient:
    client.cookies.set(SESSION_COOKIE, mint_sandbox_session_token(settings, user_id))
    return client


def test_landing_page_offers_sign_in_to_visitors(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert "See yourself restyled" in response.text
    assert 'href="/sign-in?next=/studio"' in response.text
    assert "Sandbox mode" in response.text


def test_health_reports_mode(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "mode": "sandbox"}


def test_protected_page_redirects_to_sign_in(client: TestClient) -> None:
    response = client.get("/studio", follow_redirects=False)
    assert response.status_code in (302, 303, 307)
    assert response.headers["location"] == "/sign-in?next=/studio"


def test_protected_htmx_request_gets_a_bare_401(client: TestClient) -> None:
    # No HX-Redirect: a poll must never navigate away (from a live stream); the page's script refreshes
    # the session token and the poll tries again (tests/app/test_session_refresh.py).
    response = client.get("/studio", headers={"HX-Request": "true"}, follow_redirects=False)
    assert response.status_code == 401
    assert "HX-Redirect" not in response.headers


def test_protected_api_gets_json_401(client: TestClient) -> None:
    response = client.post("/api/stream/ticket", follow_redirects=False)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"


def test_valid_session_opens_the_studio(client: TestClient, settings: Settings) -> None:
    response = signed_in(client, settings).get("/studio")
    assert response.status_code == 200
    assert 'data-testid="sign-out"' in response.text


def test_session_for_another_origin_is_refused(settings: Settings, tmp_path: Path) -> None:
    # authorized_parties pins tokens to this app's origin: a token minted for another origin is ignored.
    elsewhere = load_settings({"APP_URL": "http://evil.example"}, state_dir=settings.state_dir, dotenv=None)
    with TestClient(create_app(settings), base_url=settings.app_url) as client:
        client.cookies.set(SESSION_COOKIE, mint_sandbox_session_token(elsewhere, "user_x"))
        assert client.get("/studio", follow_redirects=False).status_code in (302, 303, 307)


def test_expired_or_forged_session_is_refused(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    client.cookies.set(SESSION_COOKIE, mint_sandbox_session_token(settings, "user_old", now=1_000_000))
    assert client.get("/studio", follow_redirects=False).status_code in (302, 303, 307)
    other_keys = load_settings({}, state_dir=tmp_path / "other", dotenv=None)
    client.cookies.set(SESSION_COOKIE, mint_sandbox_session_token(other_keys, "user_forged"))
    assert client.get("/studio", follow_redirects=False).status_code in (302, 303, 307)


def test_sign_in_page_has_the_sandbox_form(client: TestClient) -> None:
    page = client.get("/sign-in?next=/account").text
    assert 'name="email"' in page
    assert 'data-testid="sign-in"' in page
    assert 'value="/account"' in page


def test_sign_in_never_redirects_off_site(client: TestClient) -> None:
    page = client.get("/sign-in?next=//evil.example/phish").text
    assert "evil.example" not in page


def test_form_posts_need_the_csrf_token(client: TestClient) -> None:
    client.get("/sign-in")  # sets the CSRF cookie
    refused = client.post("/sign-in", data={"email": "a@example.com"}, follow_redirects=False)
    assert refused.status_code == 403


def test_security_headers_on_pages(client: TestClient) -> None:
    headers = client.get("/").headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"


def test_secrets_never_reach_the_browser(client: TestClient, settings: Settings) -> None:
    pages = [client.get(path).text for path in ("/", "/sign-in")]
    pages.append(signed_in(client, settings).get("/studio").text)
    for secret in (
        settings.clerk_secret_key,
        settings.stream_secret,
        settings.chargebee_api_key,
        settings.chargebee_webhook_password,
        settings.csrf_secret,
    ):
        assert all(secret not in page for page in pages)


def test_htmx_is_the_pinned_unmodified_asset(client: TestClient) -> None:
    import hashlib

    response = client.get("/static/vendor/htmx/htmx.min.js")
    assert response.status_code == 200
    recorded = (Path(__file__).parents[2] / "app/static/vendor/htmx/VERSION").read_text()
    assert hashlib.sha256(response.content).hexdigest() in recorded
    assert client.get("/static/vendor/htmx/LICENSE").status_code == 200


def test_clerk_emulator_is_not_mounted_in_live_mode(tmp_path: Path) -> None:
    from tests.app.test_settings import live_environment

    live = load_settings(live_environment(), state_dir=tmp_path, dotenv=None)
    with TestClient(create_app(live), base_url=live.app_url) as client:
        assert client.get("/sandbox/clerk/v1/users").status_code == 404
        assert client.post("/sign-in", data={"email": "a@example.com"}).status_code in (403, 404)
        page = client.get("/sign-in").text
        assert 'id="clerk-sign-in"' in page
        assert "https://brave-otter-12.clerk.accounts.dev/npm/@clerk/clerk-js@6/" in page


def test_only_the_session_cookie_identifies_a_person(client: TestClient, settings: Settings) -> None:
    token = mint_sandbox_session_token(settings, "user_cookie_only")
    # A token in an Authorization header (how machine callers authenticate) signs nobody in...
    response = client.get("/studio", headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)
    assert response.status_code in (302, 303, 307)
    # ...and an unrelated Authorization header does not hide the cookie.
    client.cookies.set(SESSION_COOKIE, token)
    assert client.get("/studio", headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code == 200
