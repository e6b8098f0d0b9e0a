"""Live mode's sign-in and session refresh in Chromium, against the app in live mode on a real socket.

There is no Clerk instance here, so the two scripts Clerk serves from the instance's Frontend API host
(ClerkJS and its UI bundle) are answered by the browser's network layer with a stand-in that records what
the app's own code (clerk.js, session.js) asks of it, and behaves as ClerkJS does where the app relies on
it: `load()`, a session whose `getToken()` writes a fresh `__session` cookie, `mountSignIn`,
`mountUserButton`. Everything else is the app as deployed: its templates, its Content-Security-Policy,
the server's token verification with CLERK_JWT_KEY.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.auth import CLIENT_UAT_COOKIE, SESSION_COOKIE
from app.factory import create_app
from app.settings import load_settings
from tests.app.test_settings import live_environment
from tests.live_server import free_port, serve

pytestmark = pytest.mark.browser

FAPI = "https://brave-otter-12.clerk.accounts.dev"


@dataclass
class LiveApp:
    url: str
    key: rsa.RSAPrivateKey

    def token(self, user_id: str = "user_live") -> str:
        """A session token as Clerk would issue it for this instance and origin."""
        now = int(time.time())
        claims = {"sub": user_id, "sid": "sess_live", "azp": self.url, "iss": FAPI, "iat": now, "v": 2}
        return jwt.encode({**claims, "nbf": now - 5, "exp": now + 60}, self.key, algorithm="RS256")


@pytest.fixture
def live_app(tmp_path: Path) -> Iterator[LiveApp]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    port = free_port()
    env = {
        **live_environment(),
        "APP_URL": f"http://127.0.0.1:{port}",
        "CLERK_JWT_KEY": public.decode(),
        # Nothing listens there: the meter says Clerk is unavailable instead of waiting on the internet.
        "CLERK_API_URL": "http://127.0.0.1:9/v1",
    }
    env.pop("INFERENCE_URL")
    settings = load_settings(env, port=port, state_dir=tmp_path, dotenv=None)
    with serve(create_app(settings), port) as url:
        yield LiveApp(url=url, key=key)


def stand_in_clerk(page: Any, *, fresh_token: str | None) -> list[str]:
    """Answer the Frontend API host's script URLs with a recording ClerkJS stand-in; the URLs asked for.
    `fresh_token`: what the signed-in session's getToken() returns (None: the browser is signed out)."""
    requested: list[str] = []
    session = (
        "null"
        if fresh_token is None
        else """{
          async getToken(options) {
            calls.push(["getToken", options ?? null]);
            sessionStorage.setItem("getToken", JSON.stringify(options ?? null));
            document.cookie = `__session=${FRESH}; path=/; samesite=lax`;
            return FRESH;
          },
        }"""
    )
    clerk_js = f"""
      const FRESH = {json.dumps(fresh_token)};
      const calls = (window.__clerkCalls = []);
      window.Clerk = {{
        loaded: false,
        session: undefined,
        user: undefined,
        async load(options) {{
          const passedUi = options?.ui?.ClerkUI === window.__internal_ClerkUICtor;
          calls.push(["load", {{ ...options, ui: {{ ClerkUI: passedUi }} }}]);
          this.loaded = true;
          this.session = {session};
          this.user = this.session ? {{ id: "user_live" }} : null;
          // As ClerkJS does on finding the client signed out.
          if (!this.session) document.cookie = "__client_uat=0; path=/; samesite=lax";
        }},
        mountSignIn(node, props) {{
          calls.push(["mountSignIn", props ?? null]);
          node.textContent = "Clerk SignIn";
        }},
        mountUserButton(node, props) {{
          calls.push(["mountUserButton", props ?? null]);
          node.textContent = "Clerk UserButton";
        }},
      }};
    """
    ui_js = "window.__internal_ClerkUICtor = function ClerkUI() {};"

    def fulfil(route: Any) -> None:
        url = route.request.url
        requested.append(url)
        body = ui_js if url.endswith("/ui.browser.js") else clerk_js
        route.fulfill(
            status=200,
            body=body,
            headers={"content-type": "text/javascript", "access-control-allow-origin": "*"},
        )

    page.route(f"{FAPI}/npm/**", fulfil)
    return requested


def calls(page: Any) -> list[list[Any]]:
    page.wait_for_function("() => (window.__clerkCalls ?? []).some(([name]) => name.startsWith('mount'))")
    return list(page.evaluate("() => window.__clerkCalls"))


def csp_violations(page: Any) -> list[str]:
    found: list[str] = []
    page.on(
        "console", lambda message: "Content Security Policy" in message.text and found.append(message.text)
    )
    return found


def test_live_sign_in_mounts_clerks_sign_in_that_also_signs_up(live_app: LiveApp, page: Any) -> None:
    requested = stand_in_clerk(page, fresh_token=None)
    violations = csp_violations(page)
    page.goto(f"{live_app.url}/sign-in?next=/account")
    made = calls(page)
    assert sorted(requested) == [
        f"{FAPI}/npm/@clerk/clerk-js@6/dist/clerk.browser.js",
        f"{FAPI}/npm/@clerk/ui@1/dist/ui.browser.js",
    ]
    load = next(options for name, options in made if name == "load")
    assert load == {"ui": {"ClerkUI": True}, "signInUrl": "/sign-in", "afterSignOutUrl": "/"}
    mount = next(props for name, props in made if name == "mountSignIn")
    assert mount == {"withSignUp": True, "forceRedirectUrl": "/account", "signUpForceRedirectUrl": "/account"}
    assert page.locator("[data-testid=clerk-sign-in]").inner_text() == "Clerk SignIn"
    assert violations == []


def test_live_user_button_gets_no_deprecated_props(live_app: LiveApp, page: Any) -> None:
    stand_in_clerk(page, fresh_token=live_app.token())
    page.context.add_cookies([{"name": SESSION_COOKIE, "value": live_app.token(), "url": live_app.url}])
    page.goto(f"{live_app.url}/studio")
    made = calls(page)
    assert ["mountUserButton", None] in made
    assert page.locator("[data-testid=user-button]").inner_text() == "Clerk UserButton"


def test_live_returning_browser_is_refreshed_by_clerkjs_before_the_server_decides(
    live_app: LiveApp, page: Any
) -> None:
    stand_in_clerk(page, fresh_token=live_app.token())
    visited: list[str] = []
    page.on("framenavigated", lambda frame: frame == page.main_frame and visited.append(frame.url))
    # Back after an hour: no token, but Clerk's client cookie says the browser is signed in.
    page.context.add_cookies(
        [{"name": CLIENT_UAT_COOKIE, "value": str(int(time.time()) - 3600), "url": live_app.url}]
    )
    page.goto(f"{live_app.url}/studio")
    page.wait_for_selector("[data-testid=start]")
    assert visited == [
        f"{live_app.url}/studio",
        f"{live_app.url}/studio",
    ]  # the refresh page, then the studio
    # The refresh page asked ClerkJS for a token past its cache (which writes the cookie).
    assert page.evaluate("() => JSON.parse(sessionStorage.getItem('getToken'))") == {"skipCache": True}


def test_live_returning_browser_whose_session_ended_goes_to_sign_in(live_app: LiveApp, page: Any) -> None:
    stand_in_clerk(page, fresh_token=None)
    page.context.add_cookies(
        [{"name": CLIENT_UAT_COOKIE, "value": str(int(time.time()) - 3600), "url": live_app.url}]
    )
    page.goto(f"{live_app.url}/account?returned=portal")
    page.wait_for_url(f"{live_app.url}/sign-in?next=/account%3Freturned%3Dportal")
    page.wait_for_selector("[data-testid=clerk-sign-in]")
