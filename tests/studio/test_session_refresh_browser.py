"""Sessions in a real browser, with sandbox tokens that live Clerk's 60 seconds (no shortcut: the test waits
past a token's life). One session, told in order:

1. Sign in, open the studio, start a stream. The tab's one scheduled token refresh fails (the request is
   dropped on the network), so the token expires mid-stream: the meter's poll gets a 401, the page
   refreshes the token on demand, the poll works again, the stream never stops and the page never leaves.
2. The same browser comes back in a new tab holding only the cookies it had at sign-in (the token long
   expired): /account and the studio's meter open without any sign-in page.
3. Sign out there. A copy of the cookies from before the sign-out no longer works, and the streaming tab,
   whose session is now gone, says so without navigating away from its live stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import AppProcess, save_screenshot, sign_in

pytestmark = pytest.mark.browser

TOKENS = re.compile(r"/sandbox/clerk/v1/client/sessions/[^/]+/tokens$")
TOKEN_SECONDS = 60
SERVER_LEEWAY_SECONDS = 5  # the SDK's clock skew allowance: a token is refused this long after its exp


class Watch:
    """What one page did: its main-frame navigations, meter answers, token refreshes and sockets."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.navigations: list[str] = []
        self.meter: list[tuple[float, int]] = []
        self.refreshes: list[tuple[float, int]] = []
        self.sockets_closed = 0
        self.frames_in = 0
        page.on(
            "framenavigated", lambda frame: frame == page.main_frame and self.navigations.append(frame.url)
        )
        page.on("response", self._response)
        page.on("websocket", self._socket)

    def _response(self, response: Any) -> None:
        if "/partials/usage-meter" in response.url:
            self.meter.append((time.monotonic(), response.status))
        elif TOKENS.search(response.url):
            self.refreshes.append((time.monotonic(), response.status))

    def _socket(self, socket: Any) -> None:
        socket.on("framereceived", self._frame)
        socket.on("close", lambda _: setattr(self, "sockets_closed", self.sockets_closed + 1))

    def _frame(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            self.frames_in += 1


def test_sessions_outlive_their_tokens_and_end_at_sign_out(
    start_app: Callable[..., AppProcess], browser: Any, page: Any
) -> None:
    app = start_app(FREE_PLAN_SECONDS="600")
    studio = Watch(page)

    # The first scheduled refresh is lost on the network; later ones go through.
    dropped: list[str] = []

    def lose_first_refresh(route: Any) -> None:
        if not dropped:
            dropped.append(route.request.url)
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route(TOKENS, lose_first_refresh)
    sign_in(page, app.url, "returning@example.com")
    signed_in_at = time.monotonic()
    studio.navigations.clear()
    at_sign_in = page.context.storage_state()
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=status][data-state=streaming]", timeout=30_000)
    page.wait_for_selector("[data-testid=usage-meter-body]")

    # 1. Past the token's life (and the server's leeway), with one refresh lost.
    expiry = signed_in_at + TOKEN_SECONDS + SERVER_LEEWAY_SECONDS
    page.wait_for_timeout(max(0.0, expiry - time.monotonic()) * 1000 + 1000)

    def meter_recovered() -> bool:
        refused = [at for at, status in studio.meter if status == 401]
        return bool(refused) and any(status == 200 and at > refused[0] for at, status in studio.meter)

    deadline = time.monotonic() + 20
    while not meter_recovered() and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    assert dropped, "the tab scheduled a token refresh within the token's life"
    assert meter_recovered(), studio.meter
    first_refused = next(at for at, status in studio.meter if status == 401)
    assert any(status == 200 and at > first_refused for at, status in studio.refreshes), studio.refreshes
    frames_before = studio.frames_in
    page.wait_for_timeout(2000)
    assert studio.frames_in > frames_before, "the stream kept delivering frames"
    assert studio.sockets_closed == 0
    assert page.locator("[data-testid=status]").get_attribute("data-state") == "streaming"
    assert studio.navigations == []
    assert page.locator("[data-testid=signed-out-notice]").count() == 0

    # 2. A new tab with the cookies of sign-in time: the token in them expired a minute ago.
    returning = browser.new_context(storage_state=at_sign_in, viewport={"width": 1280, "height": 900})
    tab = returning.new_page()
    tab_watch = Watch(tab)
    tab.goto(f"{app.url}/account")
    tab.wait_for_selector("[data-testid=account-plan]")
    assert tab.locator("[data-testid=account-plan]").inner_text() == "Free"
    tab.goto(f"{app.url}/studio")
    tab.wait_for_selector("[data-testid=usage-meter-body]")
    assert not [url for url in tab_watch.navigations if "/sign-in" in url], tab_watch.navigations
    save_screenshot(tab, "session-refreshed-studio")

    # 3. Sign out in that tab; then replay what the browser held just before.
    before_sign_out = returning.storage_state()
    tab.click("[data-testid=sign-out]")
    tab.wait_for_url(f"{app.url}/")
    for replayed in (before_sign_out, at_sign_in):
        thief = browser.new_context(storage_state=replayed)
        stolen = thief.new_page()
        stolen.goto(f"{app.url}/account")
        stolen.wait_for_url(re.compile(r".*/sign-in\?next=/account$"))
        assert stolen.locator("[data-testid=account-plan]").count() == 0
        thief.close()
    returning.close()

    # The streaming tab learns of it at its next refresh: a notice, the stream still running, still here.
    page.wait_for_selector("[data-testid=signed-out-notice]", timeout=20_000)
    assert page.locator("[data-testid=status]").get_attribute("data-state") == "streaming"
    assert studio.sockets_closed == 0
    assert studio.navigations == []
    save_screenshot(page, "signed-out-while-streaming")
    page.click("[data-testid=stop]")
