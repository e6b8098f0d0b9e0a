"""Sign-in end to end: the real Clerk SDK over a real socket to the emulator, then in Chromium."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import jwt
import pytest

from tests.conftest import AppProcess, save_screenshot, sign_in


def csrf_token(client: httpx.Client, path: str = "/sign-in") -> str:
    page = client.get(path).text
    match = re.search(r'name="_csrf_token" value="([^"]+)"', page)
    assert match, "sign-in form carries a CSRF token"
    return match.group(1)


def test_sign_in_creates_the_user_once_and_sets_a_session(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url) as client:
        token = csrf_token(client)
        response = client.post(
            "/sign-in", data={"email": "ada@example.com", "next": "/studio", "_csrf_token": token}
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/studio"
        # Clerk's cookies: a 60-second session token, the client's "updated at", the client itself
        # (HttpOnly, sent to the Frontend API only).
        claims = jwt.decode(client.cookies["__session"], options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 60
        assert int(client.cookies["__client_uat"]) == claims["iat"]
        client_cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("__client="))
        assert "HttpOnly" in client_cookie
        assert "Path=/sandbox/clerk/v1/client" in client_cookie
        assert client.get("/studio").status_code == 200

    with httpx.Client(base_url=app.url) as again:
        again.post("/sign-in", data={"email": "ADA@example.com", "_csrf_token": csrf_token(again)})
        assert again.get("/studio").status_code == 200

    # Both sign-ins found the same Clerk user, and it survives a restart of the app.
    app.process.terminate()
    app.process.wait(timeout=15)
    restarted = start_app(state_dir=app.state_dir)
    clerk = restarted.clerk()
    users = clerk.users.list(request={"email_address": ["ada@example.com"]})
    assert users is not None
    assert [user.email_addresses[0].email_address for user in users] == ["ada@example.com"]


def test_bad_email_is_answered_on_the_form(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url) as client:
        response = client.post("/sign-in", data={"email": "not-an-email", "_csrf_token": csrf_token(client)})
        assert response.status_code == 400
        assert 'data-testid="sign-in-error"' in response.text
        assert "__session" not in client.cookies


def test_sign_out_revokes_the_session(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url) as client:
        client.post("/sign-in", data={"email": "eve@example.com", "_csrf_token": csrf_token(client)})
        kept = {name: client.cookies[name] for name in ("__session", "__client", "__client_uat")}
        session_id = jwt.decode(kept["__session"], options={"verify_signature": False})["sid"]
        signed_out = client.post("/sign-out", data={"_csrf_token": csrf_token(client, "/studio")})
        assert signed_out.status_code == 303
        assert signed_out.headers["location"] == "/"
        assert client.cookies["__client_uat"] == "0"
        assert "__session" not in client.cookies

    # The cookies from before, replayed within the token's minute: nobody is signed in with them.
    with httpx.Client(base_url=app.url, cookies=kept) as replay:
        assert replay.get("/studio").headers["location"] == "/sign-in?next=/studio"
        assert replay.post("/api/stream/ticket").status_code == 401
        refreshed = replay.post(
            f"/sandbox/clerk/v1/client/sessions/{session_id}/tokens", headers={"Origin": app.url}
        )
        assert refreshed.status_code == 401
    clerk = app.clerk()
    assert clerk.sessions.get(session_id=session_id).status == "revoked"


def test_sign_out_with_an_expired_token_still_ends_the_session(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url) as client:
        client.post("/sign-in", data={"email": "idle@example.com", "_csrf_token": csrf_token(client)})
        token = client.cookies["__session"]
        session_id = jwt.decode(token, options={"verify_signature": False})["sid"]
        # The same token, expired: what a tab that slept through its refreshes still holds.
        secrets = json.loads((app.state_dir / "sandbox-secrets.json").read_text())
        stale = jwt.decode(token, options={"verify_signature": False})
        stale.update(iat=stale["iat"] - 600, nbf=stale["nbf"] - 600, exp=stale["exp"] - 600)
        client.cookies.set("__session", jwt.encode(stale, secrets["jwt_private_key_pem"], algorithm="RS256"))
        client.post("/sign-out", data={"_csrf_token": csrf_token(client)})
        refreshed = client.post(
            f"/sandbox/clerk/v1/client/sessions/{session_id}/tokens", headers={"Origin": app.url}
        )
        assert refreshed.status_code == 401


@pytest.mark.browser
def test_browser_sign_in_studio_sign_out(start_app: Callable[..., AppProcess], page: object) -> None:
    app = start_app()
    page.goto(f"{app.url}/studio")  # type: ignore[attr-defined]
    page.wait_for_url(f"{app.url}/sign-in?next=/studio")  # type: ignore[attr-defined]
    sign_in(page, app.url, "grace@example.com")
    assert page.url == f"{app.url}/studio"  # type: ignore[attr-defined]
    save_screenshot(page, "signed-in-studio")
    page.click("[data-testid=sign-out]")  # type: ignore[attr-defined]
    page.wait_for_url(f"{app.url}/")  # type: ignore[attr-defined]
    page.goto(f"{app.url}/studio")  # type: ignore[attr-defined]
    page.wait_for_url(re.compile(r".*/sign-in\?next=/studio$"))  # type: ignore[attr-defined]
