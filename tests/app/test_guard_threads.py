"""Signed-in requests are served on the event loop: the sign-in guard costs no worker thread.

Litestar runs a synchronous guard in a worker thread. The studio's meter polls every 5 s per open tab, so a
sync `requires_user` meant a thread hop per poll (bench/app_load.py: ~10% of the app's CPU at 400
streams), and a burst of polls started a thread per concurrent request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import AppProcess


def threads_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


async def burst(
    url: str, cookies: httpx.Cookies, path: str, headers: dict[str, str], count: int
) -> list[int]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, cookies=cookies, limits=limits, timeout=20) as client:
        answers = await asyncio.gather(*(client.get(path, headers=headers) for _ in range(count)))
    return [answer.status_code for answer in answers]


def sign_in(browser: httpx.Client) -> None:
    browser.get("/sign-in")
    answer = browser.post(
        "/sign-in", data={"email": "threads@example.com", "_csrf_token": browser.cookies["stylecast_csrf"]}
    )
    assert answer.status_code == 303


def test_a_burst_of_meter_polls_starts_no_thread_in_the_app(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url, timeout=10) as browser:
        sign_in(browser)
        htmx = {"HX-Request": "true"}
        assert browser.get("/partials/usage-meter", headers=htmx).status_code == 200  # account now cached
        before = threads_of(app.process.pid)

        statuses = asyncio.run(burst(app.url, browser.cookies, "/partials/usage-meter", htmx, 40))

        assert statuses == [200] * 40
        assert threads_of(app.process.pid) == before


def test_the_guard_still_refuses_every_guarded_route_without_a_session(
    start_app: Callable[..., AppProcess],
) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url, timeout=10, follow_redirects=False) as browser:
        for path in ("/studio", "/account"):
            page = browser.get(path, headers={"accept": "text/html"})
            assert page.status_code in (302, 303, 307), path
            assert page.headers["location"].startswith("/sign-in"), path
        meter = browser.get("/partials/usage-meter", headers={"HX-Request": "true"})
        assert meter.status_code == 401
        assert "usage-meter-body" not in meter.text

        sign_in(browser)
        assert browser.get("/studio", headers={"accept": "text/html"}).status_code == 200
        assert browser.get("/partials/usage-meter", headers={"HX-Request": "true"}).status_code == 200
