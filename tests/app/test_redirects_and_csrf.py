"""Against `python -m app`: signing in never sends anyone off the app, whatever `next` says, and a
signed-in user's checkout, portal and sign-out posts need the CSRF token, from any page of the same site
(another port of the same host is the same site, so its posts carry the user's cookies)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from litestar import Litestar, get
from litestar.response import Response
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from billing.metadata import decode_metadata
from tests.conftest import AppProcess, close_context, sign_in
from tests.live_server import serve

CSRF_FIELD = re.compile(r'name="_csrf_token" value="([^"]+)"')
# Each of these, followed by a browser, leaves the site: a scheme-relative URL, an absolute one, and
# backslashes and tabs that browsers' URL parsers turn into "//".
OFF_SITE_NEXT = [
    "//evil.example",
    "https://evil.example",
    "/\\evil",
    "/\\/evil.example",
    "\\\\evil.example",
    "/\t/evil.example",
    "https:evil.example",
    "//evil.example/studio",
]
BILLING_POSTS = {"/api/billing/checkout": {"plan": "pro"}, "/api/billing/portal": {}}


def form_token(client: httpx.Client, path: str) -> str:
    match = CSRF_FIELD.search(client.get(path).text)
    assert match, f"{path} has a form with a CSRF token"
    return match.group(1)


def post_sign_in(client: httpx.Client, email: str, next_path: str) -> httpx.Response:
    token = form_token(client, "/sign-in")
    return client.post("/sign-in", data={"email": email, "next": next_path, "_csrf_token": token})


def signed_in_client(app: AppProcess, email: str) -> httpx.Client:
    client = httpx.Client(base_url=app.url, timeout=20)
    answer = client.post("/sign-in", data={"email": email, "_csrf_token": form_token(client, "/sign-in")})
    assert answer.status_code == 303, answer.text
    assert client.get("/studio").status_code == 200
    return client


def customer_of(app: AppProcess, email: str) -> str | None:
    """The ChargeBee customer the app recorded for this user (a checkout or portal visit records one)."""
    users = app.clerk().users.list(request={"email_address": [email]})
    assert users is not None
    assert len(users) == 1
    metadata = decode_metadata(users[0].public_metadata, users[0].private_metadata)
    return metadata.private.customer_id


def lands_on(app: AppProcess, location: str) -> bool:
    """Whether a browser following `location` from the app stays on it (the WHATWG URL parser drops tabs
    and newlines and reads a backslash as a slash)."""
    cleaned = re.sub(r"[\t\n\r]", "", location).replace("\\", "/")
    return cleaned.startswith("/") and not cleaned.startswith("//") and urlsplit(cleaned).netloc == ""


# ---- next= ---------------------------------------------------------------------------------------------


def test_sign_in_with_an_off_site_next_lands_on_the_app(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    for target in OFF_SITE_NEXT:
        with httpx.Client(base_url=app.url, timeout=20) as client:
            answer = post_sign_in(client, "next@example.com", target)
            assert answer.status_code == 303, (target, answer.text)
            location = answer.headers["location"]
            assert lands_on(app, location), (target, location)
    # A same-site path is kept: the check does not just send everyone to the studio.
    with httpx.Client(base_url=app.url, timeout=20) as client:
        assert post_sign_in(client, "next@example.com", "/account").headers["location"] == "/account"


@pytest.mark.browser
def test_a_browser_signing_in_with_an_off_site_next_stays_on_the_app(
    start_app: Callable[..., AppProcess], browser: Any
) -> None:
    """What a browser does with the answer is what matters: it reads `/\\evil` as `//evil`."""
    app = start_app()
    origin = urlsplit(app.url).netloc
    for target in OFF_SITE_NEXT:
        context = browser.new_context()
        left_the_app: list[str] = []

        def only_the_app(route: Any, left: list[str] = left_the_app) -> None:
            if urlsplit(route.request.url).netloc == origin:
                route.continue_()
            else:
                left.append(route.request.url)
                route.fulfill(status=200, content_type="text/plain", body="another site")

        context.route("**/*", only_the_app)
        page = context.new_page()
        page.goto(f"{app.url}/sign-in")
        page.fill("input[name=email]", "browser-next@example.com")
        # The form's hidden field as an attacker's link or form would set it.
        page.locator("input[name=next]").evaluate("(field, value) => { field.value = value; }", target)
        page.click("[data-testid=sign-in]")
        # Off-site, the page would go elsewhere, or (the CSP's form-action also covers a form's redirects)
        # stay on the sign-in form with the navigation blocked.
        with contextlib.suppress(PlaywrightTimeoutError):
            page.wait_for_url(lambda url: urlsplit(url).path != "/sign-in", timeout=10_000)
        page.wait_for_load_state()
        assert left_the_app == [], (target, left_the_app)
        assert urlsplit(page.url).netloc == origin, (target, page.url)
        assert urlsplit(page.url).path != "/sign-in", (target, "the redirect did not land")
        assert "__session" in {cookie["name"] for cookie in context.cookies()}, target  # and signed in
        close_context(context)


# ---- CSRF ----------------------------------------------------------------------------------------------


def test_signed_in_posts_without_the_csrf_token_are_refused(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    email = "csrf@example.com"
    with (
        contextlib.closing(signed_in_client(app, email)) as client,
        contextlib.closing(signed_in_client(app, "other@example.com")) as other,
    ):
        someone_elses = form_token(other, "/account")
        own = form_token(client, "/account")
        for path, data in {**BILLING_POSTS, "/sign-out": {}}.items():
            refused = [
                client.post(path, data=data),
                client.post(path, data={**data, "_csrf_token": "x" * len(own)}),
                client.post(path, data={**data, "_csrf_token": someone_elses}),
                client.post(path, data=data, headers={"x-csrftoken": someone_elses}),
            ]
            assert [answer.status_code for answer in refused] == [403] * 4, path
            assert all("location" not in answer.headers for answer in refused), path
        # Nothing happened: no ChargeBee customer was made for the user, and they are still signed in.
        assert customer_of(app, email) is None
        assert client.get("/studio").status_code == 200

        # With the token, each works, so the refusals above were the token's doing.
        checkout = client.post("/api/billing/checkout", data={"plan": "pro", "_csrf_token": own})
        assert checkout.status_code == 303, checkout.text
        assert "/sandbox/chargebee/" in checkout.headers["location"]
        assert customer_of(app, email) is not None
        portal = client.post("/api/billing/portal", data={"_csrf_token": own})
        assert portal.status_code == 303, portal.text
        assert "/sandbox/chargebee/" in portal.headers["location"]
        signed_out = client.post("/sign-out", data={"_csrf_token": own})
        assert signed_out.status_code == 303
        assert client.get("/studio").headers["location"].startswith("/sign-in")


ATTACKER_PAGE = """<!doctype html><title>Win a prize</title>
<form method="post" action="{app}/api/billing/checkout"><input name="plan" value="pro">
  <button id="checkout">Claim</button></form>
<form method="post" action="{app}/api/billing/portal"><button id="portal">Claim</button></form>
<form method="post" action="{app}/sign-out"><button id="sign-out">Claim</button></form>"""


@pytest.fixture
def attacker_site(start_app: Callable[..., AppProcess]) -> Iterator[tuple[AppProcess, str]]:
    """The app, and a page on another port of the same host: the same site, so the browser sends the app's
    SameSite=Lax cookies with its posts; only the CSRF token tells them apart."""
    app = start_app()

    @get("/", sync_to_thread=False)
    def page() -> Response[str]:
        return Response(ATTACKER_PAGE.format(app=app.url), media_type="text/html")

    with serve(Litestar(route_handlers=[page]), lifespan="off") as url:
        yield app, url


@pytest.mark.browser
def test_a_same_site_page_cannot_post_for_a_signed_in_user(
    attacker_site: tuple[AppProcess, str], page: Any
) -> None:
    app, attacker = attacker_site
    email = "victim@example.com"
    sign_in(page, app.url, email)
    for button in ("checkout", "portal", "sign-out"):
        page.goto(attacker)
        with page.expect_response(lambda answer: answer.url.startswith(app.url)) as posted:
            page.click(f"#{button}")
        assert posted.value.status == 403, button
        # The browser did send the user's session with it: the token, not the cookie policy, refused it.
        assert "__session=" in (posted.value.request.all_headers().get("cookie") or ""), button
    page.goto(f"{app.url}/studio")
    assert page.url == f"{app.url}/studio"  # still signed in: the sign-out post was refused
    assert page.locator("[data-testid=sign-out]").count() == 1
    assert customer_of(app, email) is None  # and no checkout or portal was started
