"""Against `python -m app`: a session token issued for another origin (a foreign `azp`) signs nobody in.

The token is the app's own, taken from a real sandbox sign-in, with only `azp` changed and signed again
with the sandbox key from the state directory: a token Clerk could have issued to another application
of the same instance. Re-signing it unchanged must still work, so a refusal is the `azp`'s doing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from app.auth import SESSION_COOKIE
from tests.conftest import AppProcess

CSRF_FIELD = re.compile(r'name="_csrf_token" value="([^"]+)"')
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def signed_in_token(app: AppProcess, email: str) -> str:
    with httpx.Client(base_url=app.url, timeout=20) as client:
        token = CSRF_FIELD.search(client.get("/sign-in").text)
        assert token
        answer = client.post("/sign-in", data={"email": email, "_csrf_token": token.group(1)})
        assert answer.status_code == 303, answer.text
        return client.cookies[SESSION_COOKIE]


def resigned(app: AppProcess, token: str, **changes: Any) -> str:
    secrets = json.loads((app.state_dir / "sandbox-secrets.json").read_text())
    claims = {**jwt.decode(token, options={"verify_signature": False}), **changes}
    header = jwt.get_unverified_header(token)
    return jwt.encode(
        claims, secrets["jwt_private_key_pem"], algorithm=header["alg"], headers={"kid": header["kid"]}
    )


def seen_as(app: AppProcess, token: str) -> dict[str, object]:
    """What the running app makes of a browser holding only this session token."""
    with httpx.Client(base_url=app.url, timeout=20, cookies={SESSION_COOKIE: token}) as client:
        studio = client.get("/studio", follow_redirects=True)
        account = client.get("/account", follow_redirects=True)
        csrf = CSRF_META.search(client.get("/").text)
        assert csrf, "every page carries the CSRF token for htmx"
        ticket = client.post("/api/stream/ticket", headers={"x-csrftoken": csrf.group(1)})
        meter = client.get("/partials/usage-meter", headers={"HX-Request": "true"})
        return {
            "studio": urlsplit(str(studio.url)).path,
            "account": urlsplit(str(account.url)).path,
            "ticket": ticket.status_code,
            "meter": meter.status_code,
        }


def test_a_session_token_for_another_origin_is_signed_out(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    port = urlsplit(app.url).port
    token = signed_in_token(app, "azp@example.com")
    own_party = jwt.decode(token, options={"verify_signature": False})["azp"]
    assert urlsplit(own_party).netloc == urlsplit(app.url).netloc

    assert seen_as(app, resigned(app, token)) == {
        "studio": "/studio",
        "account": "/account",
        "ticket": 200,
        "meter": 200,
    }
    for foreign in ("https://evil.example", f"http://127.0.0.1:{port + 1}", f"{own_party}.evil.example"):
        seen = seen_as(app, resigned(app, token, azp=foreign))
        assert seen == {"studio": "/sign-in", "account": "/sign-in", "ticket": 401, "meter": 401}, foreign
