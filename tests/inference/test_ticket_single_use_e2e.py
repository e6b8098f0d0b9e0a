"""Against `python -m app`: a stream ticket the app hands a signed-in user over HTTP opens one stream, once.
Presented again on a second socket, while the first streams or after it ended, it is refused with 4401:
nothing is rendered and nothing is billed for it."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable

import httpx
import jwt
from websockets.exceptions import ConnectionClosed

from app.auth import SESSION_COOKIE
from app.settings import load_settings
from billing.metadata import decode_metadata
from inference.protocol import CloseCode, Ready, Usage
from inference.tickets import verify_ticket
from tests.conftest import AppProcess
from tests.inference.helpers import OutputFrame, StreamClient, webcam_jpeg

CSRF_FIELD = re.compile(r'name="_csrf_token" value="([^"]+)"')
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
SECONDS_LEFT = re.compile(r'data-seconds-left="(\d+)"')
FREE_SECONDS = 60


def signed_in(app: AppProcess, email: str) -> tuple[httpx.Client, str]:
    """A browser's HTTP session after the sandbox sign-in form, and the CSRF token its pages carry."""
    client = httpx.Client(base_url=app.url, timeout=20)
    form = CSRF_FIELD.search(client.get("/sign-in").text)
    assert form
    answer = client.post("/sign-in", data={"email": email, "_csrf_token": form.group(1)})
    assert answer.status_code == 303, answer.text
    assert SESSION_COOKIE in client.cookies
    meta = CSRF_META.search(client.get("/studio").text)
    assert meta
    return client, meta.group(1)


def refused_replay(url: str, ticket: str) -> StreamClient:
    """Present `ticket` on a new socket, with a frame right behind the hello, and read until it closes."""
    with StreamClient.connect(url) as client:
        client.send_hello(ticket)
        # The worker may have closed already: then the frame does not even leave.
        with contextlib.suppress(ConnectionClosed):
            client.send_frame(1, webcam_jpeg(160, 120))
        client.wait_closed(timeout=10)
        return client


def test_a_ticket_from_the_app_streams_once(start_app: Callable[..., AppProcess]) -> None:
    app = start_app()
    browser, csrf = signed_in(app, "once@example.com")
    answer = browser.post("/api/stream/ticket", headers={"x-csrftoken": csrf})
    assert answer.status_code == 200, answer.text
    url, ticket = answer.json()["url"], answer.json()["ticket"]
    frame = webcam_jpeg()

    with StreamClient.connect(url) as first:
        assert isinstance(first.start(ticket, timeout=30), Ready)
        first.send_frame(1, frame)
        assert isinstance(first.frame(1), OutputFrame)

        replay = refused_replay(url, ticket)
        assert replay.close_code == CloseCode.BAD_TICKET
        assert [m for m in replay.received if isinstance(m, Ready | Usage | OutputFrame)] == []

        # The stream the ticket was issued for carries on regardless.
        first.send_frame(2, frame)
        assert isinstance(first.frame(2), OutputFrame)
    billed = max(message.seconds_used for message in first.messages(Usage))
    assert billed >= 1

    # Spent, not merely busy: the ticket is refused after its stream has ended too.
    later = refused_replay(url, ticket)
    assert later.close_code == CloseCode.BAD_TICKET
    assert [m for m in later.received if isinstance(m, Ready | Usage | OutputFrame)] == []

    # The account was charged for the one stream only, once its final report was in: one ledger entry, the
    # ticket's, closed, holding at least what the worker told the client before it left (its final report
    # may add the second the client no longer saw), and the account's counter is exactly that entry.
    user_id = jwt.decode(browser.cookies[SESSION_COOKIE], options={"verify_signature": False})["sub"]
    settings = load_settings({}, state_dir=app.state_dir, dotenv=None)
    clerk = app.clerk()
    deadline = time.monotonic() + 20
    while True:
        user = clerk.users.get(user_id=user_id)
        metadata = decode_metadata(user.public_metadata, user.private_metadata)
        streams = metadata.private.streams
        if streams and all(entry.final for entry in streams.values()):
            break
        assert time.monotonic() < deadline, streams
        time.sleep(0.2)
    ((stream_id, entry),) = streams.items()
    assert stream_id == verify_ticket(settings.stream_secret, ticket).stream_id
    assert billed <= entry.seconds <= billed + 1
    assert metadata.public.free_seconds_used == entry.seconds
    meter = browser.get("/partials/usage-meter", headers={"HX-Request": "true"})
    left = SECONDS_LEFT.search(meter.text)
    assert left, meter.text
    assert int(left.group(1)) == FREE_SECONDS - entry.seconds
    browser.close()
