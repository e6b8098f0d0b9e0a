"""Minting a sandbox session token costs a signature, not a key parse.

Every open tab refreshes its 60-second token every 50 s at the sandbox Frontend API, which runs on the
app's event loop: 1,000 tabs make 20 refreshes a second. Parsing the PEM private key for each one (an RSA
key check, ~35 ms) stalled every other request of the app behind it (bench/app_load.py measured it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.settings import SANDBOX_CLERK_PREFIX
from sandbox.clerk_sessions import mint_session_token
from tests.conftest import AppProcess

FRONTEND = f"{SANDBOX_CLERK_PREFIX}/client"


def test_fifty_session_tokens_are_minted_in_well_under_a_second_and_each_verifies() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mint = dict(issuer="https://app.test/sandbox/clerk", authorized_party="https://app.test")
    mint_session_token(private_pem, user_id="user_a", session_id="sess_a", now=time.time(), **mint)

    began = time.perf_counter()
    tokens = [
        mint_session_token(private_pem, user_id="user_a", session_id="sess_a", now=time.time(), **mint)
        for _ in range(50)
    ]
    elapsed = time.perf_counter() - began

    # A parse per token took ~35 ms each (1.8 s for fifty); a signature takes ~0.3 ms.
    assert elapsed < 0.5, f"50 tokens took {elapsed:.2f} s"
    claims = [jwt.decode(token, public_pem, algorithms=["RS256"]) for token in tokens]
    assert {claim["sid"] for claim in claims} == {"sess_a"}
    assert len({claim["jti"] for claim in claims}) == 50


def test_the_running_app_refreshes_a_tab_token_in_milliseconds_and_the_new_token_signs_it_in(
    start_app: Callable[..., AppProcess],
) -> None:
    app = start_app()
    with httpx.Client(base_url=app.url, timeout=10) as browser:
        browser.get("/sign-in")
        csrf = browser.cookies["stylecast_csrf"]
        signed_in = browser.post("/sign-in", data={"email": "tab@example.com", "_csrf_token": csrf})
        assert signed_in.status_code == 303
        session_id = browser.get(FRONTEND).json()["response"]["last_active_session_id"]

        took = []
        tokens = set()
        for _ in range(20):
            began = time.perf_counter()
            answer = browser.post(f"{FRONTEND}/sessions/{session_id}/tokens", headers={"origin": app.url})
            took.append(time.perf_counter() - began)
            assert answer.status_code == 200
            tokens.add(answer.json()["jwt"])
        assert len(tokens) == 20
        # Before: ~40 ms each, all of it blocking the event loop.
        assert statistics.median(took) < 0.02, f"median refresh {statistics.median(took) * 1000:.1f} ms"

        meter = browser.get("/partials/usage-meter", headers={"HX-Request": "true"})
        assert meter.status_code == 200
        assert "usage-meter-body" in meter.text
