from __future__ import annotations

import time

import jwt
import pytest

from inference.tickets import (
    DEFAULT_TTL_SECONDS,
    LEEWAY_SECONDS,
    Ticket,
    TicketError,
    issue_ticket,
    verify_ticket,
)
from tests.inference.helpers import SECRET

NOW = 1_800_000_000


def _issue(**overrides: object) -> str:
    options: dict[str, object] = {
        "user_id": "user_1",
        "stream_id": "stream_1",
        "allowance_seconds": 90,
        "now": NOW,
    }
    options.update(overrides)
    return issue_ticket(SECRET, **options)  # type: ignore[arg-type]


def test_a_ticket_carries_who_streams_and_how_long() -> None:
    ticket = verify_ticket(SECRET, _issue(), now=NOW + 1)
    assert ticket == Ticket(
        user_id="user_1",
        stream_id="stream_1",
        allowance_seconds=90,
        expires_at=NOW + DEFAULT_TTL_SECONDS,
        ticket_id=ticket.ticket_id,
    )
    assert ticket.ticket_id != verify_ticket(SECRET, _issue(), now=NOW).ticket_id  # unique per ticket


def test_a_ticket_expires_after_its_ttl() -> None:
    token = _issue(ttl_seconds=30)
    verify_ticket(SECRET, token, now=NOW + 30 + LEEWAY_SECONDS - 1)
    with pytest.raises(TicketError, match="expired"):
        verify_ticket(SECRET, token, now=NOW + 30 + LEEWAY_SECONDS)


def test_a_ticket_from_the_future_is_refused() -> None:
    with pytest.raises(TicketError, match="future"):
        verify_ticket(SECRET, _issue(), now=NOW - 60)


def test_a_forged_or_tampered_ticket_is_refused() -> None:
    with pytest.raises(TicketError, match="signature"):
        verify_ticket("another-secret-that-is-long-enough-000", _issue(), now=NOW)
    header, payload, signature = _issue().split(".")
    generous = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b'"allowance":90', b'"allowance":99999')
    ).decode()
    with pytest.raises(TicketError, match="signature"):
        verify_ticket(SECRET, f"{header}.{generous}.{signature}", now=NOW)


def test_an_unsigned_token_is_refused() -> None:
    unsigned = jwt.encode(
        {"iss": "stylecast-app", "aud": "stylecast-worker", "sub": "u", "stream_id": "s", "allowance": 1},
        key=None,
        algorithm="none",
    )
    with pytest.raises(TicketError):
        verify_ticket(SECRET, unsigned, now=NOW)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "some-api"}, "audience"),
        ({"iss": "clerk"}, "issuer"),
        ({"allowance": -5}, "allowance"),
        ({"allowance": "lots"}, "allowance"),
        ({"sub": ""}, "sub"),
    ],
)
def test_other_jwts_signed_with_the_same_secret_are_not_tickets(
    claims: dict[str, object], reason: str
) -> None:
    base: dict[str, object] = {
        "iss": "stylecast-app",
        "aud": "stylecast-worker",
        "sub": "user_1",
        "stream_id": "stream_1",
        "allowance": 10,
        "iat": NOW,
        "exp": NOW + 60,
        "jti": "t1",
    }
    base.update(claims)
    with pytest.raises(TicketError, match=reason):
        verify_ticket(SECRET, jwt.encode(base, SECRET, algorithm="HS256"), now=NOW)


def test_missing_claims_are_named() -> None:
    token = jwt.encode(
        {
            "iss": "stylecast-app",
            "aud": "stylecast-worker",
            "sub": "u",
            "iat": NOW,
            "exp": NOW + 60,
            "jti": "j",
        },
        SECRET,
        algorithm="HS256",
    )
    with pytest.raises(TicketError, match="stream_id"):
        verify_ticket(SECRET, token, now=NOW)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "e30.e30.e30"])
def test_garbage_is_refused(token: str) -> None:
    with pytest.raises(TicketError):
        verify_ticket(SECRET, token, now=NOW)


def test_issuing_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="allowance"):
        issue_ticket(SECRET, user_id="u", stream_id="s", allowance_seconds=-1)
    with pytest.raises(ValueError, match="STREAM_SECRET"):
        issue_ticket("", user_id="u", stream_id="s", allowance_seconds=1)
    # Real time by default.
    assert (
        verify_ticket(
            SECRET, issue_ticket(SECRET, user_id="u", stream_id="s", allowance_seconds=1)
        ).expires_at
        > time.time()
    )
