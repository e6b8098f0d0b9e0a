"""Nobody streams without a valid ticket: every way of getting it wrong closes the socket with 4401, and a
silent client is closed with 4408."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jwt
import pytest

from inference.protocol import CloseCode, Ready
from inference.tickets import issue_ticket
from tests.inference.helpers import (
    SECRET,
    OutputFrame,
    RunningWorker,
    StreamClient,
    new_ticket,
    running_worker,
    webcam_jpeg,
    worker_config,
)


@pytest.fixture(scope="module")
def running() -> Iterator[RunningWorker]:
    with running_worker(worker_config(hello_timeout_seconds=0.5)) as worker:
        yield worker


def _rejected(running: RunningWorker, first_message: str | bytes) -> tuple[int, str, list[object]]:
    with StreamClient.connect(running.ws_url) as client:
        client.connection.send(first_message)
        code = client.wait_closed(timeout=5)
        return code, client.close_reason or "", client.received


def test_a_valid_ticket_is_accepted(running: RunningWorker) -> None:
    with StreamClient.connect(running.ws_url) as client:
        assert isinstance(client.start(new_ticket()), Ready)


def test_a_forged_ticket_is_refused(running: RunningWorker) -> None:
    forged = issue_ticket(
        "someone-elses-secret-0123456789abcdef", user_id="u", stream_id="s", allowance_seconds=10**6
    )
    code, reason, received = _rejected(running, f'{{"type": "hello", "ticket": "{forged}"}}')
    assert code == CloseCode.BAD_TICKET
    assert "signature" in reason
    assert received == []  # not even `ready`


def test_an_expired_ticket_is_refused(running: RunningWorker) -> None:
    expired = new_ticket(now=time.time() - 3600)
    code, reason, _ = _rejected(running, f'{{"type": "hello", "ticket": "{expired}"}}')
    assert (code, reason) == (CloseCode.BAD_TICKET, "ticket has expired")


def test_a_jwt_for_another_purpose_is_refused(running: RunningWorker) -> None:
    # Signed with the right secret but not a stream ticket (e.g. some other token of the app).
    other = jwt.encode(
        {"sub": "user_1", "aud": "stylecast-app", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    code, _, _ = _rejected(running, f'{{"type": "hello", "ticket": "{other}"}}')
    assert code == CloseCode.BAD_TICKET


@pytest.mark.parametrize(
    "first_message",
    [
        '{"type": "hello"}',
        '{"type": "hello", "ticket": ""}',
        '{"type": "hello", "ticket": "not.a.jwt"}',
        '{"type": "params", "prompt": "anime"}',
        "hello",
        b"\x00\x00\x00\x00\xff\xd8\xff",
    ],
    ids=["no-ticket", "empty-ticket", "garbage-ticket", "params-first", "not-json", "frame-first"],
)
def test_anything_but_a_hello_with_a_ticket_is_refused(
    running: RunningWorker, first_message: str | bytes
) -> None:
    code, _, received = _rejected(running, first_message)
    assert code == CloseCode.BAD_TICKET
    assert received == []


def test_a_ticket_works_for_one_connection_only(running: RunningWorker) -> None:
    ticket = new_ticket()
    with StreamClient.connect(running.ws_url) as first:
        first.start(ticket)
        code, reason, _ = _rejected(running, f'{{"type": "hello", "ticket": "{ticket}"}}')
        assert (code, reason) == (CloseCode.BAD_TICKET, "ticket already used")
        # The first connection is unaffected.
        first.send_frame(1, webcam_jpeg(160, 120))
        assert isinstance(first.frame(1), OutputFrame)


def test_a_client_that_never_says_hello_is_closed(running: RunningWorker) -> None:
    with StreamClient.connect(running.ws_url) as client:
        started = time.monotonic()
        assert client.wait_closed(timeout=5) == CloseCode.HELLO_TIMEOUT
        assert 0.4 < time.monotonic() - started < 3
