"""Sign-in end to end: the real Clerk SDK over a real socket to the emulator, then in Chromium."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import pytest
from clerk_backend_api import Clerk

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
        assert "__session" in client.cookies
        assert client.get("/studio").status_code == 200

    with httpx.Client(base_url=app.url) as again:
        again.post("/sign-in", data={"email": "ADA@example.com", "_csrf_token": csrf_token(again)})
        assert again.get("/studio").status_code == 200

    # Both sign-ins found the same Clerk user, and it survives a restart of the app.
    app.process.terminate()
    app.process.wait(timeout=15)
    restarted = start_app(state_dir=app.state_dir)
    secrets = json.loads((app.state_dir / "sandbox-secrets.json").read_text())
    clerk = Clerk(bearer_auth=secrets["clerk_secret_key"], server_url=f"{restarted.url}/sandbox/clerk/v1")
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
