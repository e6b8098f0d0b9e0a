"""Sandbox sessions as Clerk keeps them: clients, sessions, sign-in tokens and 60-second session tokens.

Clerk's model, which the sandbox follows so that code broken by it breaks here first:

* A **client** is one browser. Its long-lived `__client` cookie (HttpOnly, sent only to the Frontend API)
  is the proof that lets that browser mint session tokens.
* A **session** belongs to a client and a user; it is active until it is revoked (sign-out, the user's
  deletion) or reaches its maximum lifetime.
* A **session token** (`__session`) is a JWT that lives 60 seconds. The server verifies it without asking
  anyone; the browser keeps it fresh by asking the Frontend API for a new one with its `__client` cookie.
* `__client_uat` ("updated at") is a readable cookie on the app's domain: the time the client last signed
  in, 0 once signed out. A server that sees an expired or missing token and a non-zero `__client_uat`
  knows the browser may still hold a live session and lets it refresh before deciding.

The state is one JSON file in the sandbox state directory, shared by every app process that serves it:
a change takes an exclusive lock on a lock file beside it, re-reads the file, applies itself and replaces
the file atomically; readers re-read it whenever it changed on disk. So a sign-out served by one process
is seen by the next request to any other.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import os
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from sandbox.files import write_private_file

STORE_FILE = "clerk-sessions.json"
STORE_FORMAT = "stylecast-clerk-sessions/1"

# Clerk's session token lifetime. Tokens are minted with exactly this; nothing in the sandbox changes it.
SESSION_TOKEN_SECONDS = 60
# Clerk's default maximum session lifetime (Dashboard > Sessions), after which the user signs in again.
SESSION_LIFETIME_SECONDS = 7 * 24 * 3600
# Ended sessions, used sign-in tokens and clients without sessions are forgotten after this long. Their
# session tokens died within a minute of the end, so nothing can still present them.
FORGET_AFTER_SECONDS = 24 * 3600
# A browser's client cookie lasts as long as a session can.
CLIENT_COOKIE_SECONDS = SESSION_LIFETIME_SECONDS
CLIENT_UAT_COOKIE_SECONDS = 365 * 24 * 3600

ACTIVE = "active"
REVOKED = "revoked"
EXPIRED = "expired"

_ID_ALPHABET = string.ascii_letters + string.digits
_T = TypeVar("_T")


class FrontendSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What the sandbox Frontend API needs to sign tokens and set cookies for the app's origin."""

    signing_key: str  # the sandbox RSA private key (PEM)
    issuer: str  # the `iss` of every session token
    origin: str  # the app's public origin: the token's authorized party, the only Origin allowed to POST
    secure_cookies: bool


def new_id(prefix: str) -> str:
    # Clerk ids are a prefix plus a 27-character base62 KSUID; random base62 keeps the same look.
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(27))


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_session_token(
    signing_key: str,
    *,
    issuer: str,
    authorized_party: str,
    user_id: str,
    session_id: str,
    now: float,
) -> str:
    """An RS256 session JWT with Clerk's v2 claims, valid for `SESSION_TOKEN_SECONDS` from `now`."""
    issued = int(now)
    claims = {
        "sub": user_id,
        "sid": session_id,
        "azp": authorized_party,
        "iss": issuer,
        "iat": issued,
        "nbf": issued - 10,
        "exp": issued + SESSION_TOKEN_SECONDS,
        "jti": secrets.token_hex(10),
        "v": 2,
    }
    return jwt.encode(claims, _private_key(signing_key), algorithm="RS256", headers={"kid": "sandbox"})


@functools.lru_cache(maxsize=4)
def _private_key(pem: str) -> PrivateKeyTypes:
    # Parsing the PEM checks the RSA key, ~35 ms of CPU on the event loop; signing with the parsed key
    # takes ~0.3 ms. Every open tab refreshes its token every 50 s, so it is parsed once.
    return serialization.load_pem_private_key(pem.encode(), password=None)


def _empty() -> dict[str, Any]:
    return {"format": STORE_FORMAT, "clients": {}, "sessions": {}, "sign_in_tokens": {}}


class SessionStore:
    """The file-backed clients, sessions and sign-in tokens. Times are Unix milliseconds, as Clerk's."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._clock = clock
        self._thread_lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._state: dict[str, Any] = _empty()

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # ---- reading -------------------------------------------------------------------------------------------

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def is_current(self) -> bool:
        """Whether the last read still matches the file (one stat, no read)."""
        return self._signature() == self._seen

    def state(self) -> dict[str, Any]:
        """The state as on disk now; the file is only read again when it changed."""
        with self._thread_lock:
            signature = self._signature()
            if signature != self._seen:
                self._state = self._read() if signature is not None else _empty()
                self._seen = signature
            return self._state

    def _read(self) -> dict[str, Any]:
        stored = msgspec.json.decode(self.path.read_bytes())
        if not isinstance(stored, dict) or stored.get("format") != STORE_FORMAT:
            raise ValueError(f"{self.path} is not a sandbox session store ({STORE_FORMAT})")
        return stored

    def session(self, session_id: str) -> dict[str, Any] | None:
        """The session with its status as of now (an active session past its lifetime reads `expired`)."""
        found = self.state()["sessions"].get(session_id)
        return self._as_of_now(found) if found is not None else None

    def _as_of_now(self, session: dict[str, Any]) -> dict[str, Any]:
        if session["status"] == ACTIVE and session["expire_at"] <= self.now_ms():
            return {**session, "status": EXPIRED}
        return session

    def refuses(self, session_id: str) -> bool:
        """True for a session that exists and is no longer active: its tokens must not be honoured."""
        found = self.session(session_id)
        return found is not None and found["status"] != ACTIVE

    def client_by_token(self, token: str | None) -> dict[str, Any] | None:
        if not token:
            return None
        wanted = secret_hash(token)
        for client in self.state()["clients"].values():
            if hmac.compare_digest(client["token_hash"], wanted):
                return client
        return None

    def sessions_of(
        self, *, client_id: str | None = None, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        return [
            self._as_of_now(session)
            for session in self.state()["sessions"].values()
            if (client_id is None or session["client_id"] == client_id)
            and (user_id is None or session["user_id"] == user_id)
        ]

    # ---- changing ------------------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def update(self, change: Callable[[dict[str, Any], int], _T]) -> _T:
        """Apply `change(state, now_ms)` to the state on disk under the lock, and write the result.

        Blocking (file lock, fsync): async callers run it in a thread. `change` edits the state in place and
        may raise to abandon the change; nothing is written then."""
        with self._exclusive():
            with self._thread_lock:
                current = self._read() if self._signature() is not None else _empty()
            now = self.now_ms()
            result = change(current, now)
            _forget_old(current, now)
            write_private_file(self.path, msgspec.json.encode(current))
            with self._thread_lock:
                # Read back on next use: another process may write between our replace and a stat.
                self._seen = None
            return result


def _forget_old(state: dict[str, Any], now: int) -> None:
    horizon = now - FORGET_AFTER_SECONDS * 1000
    state["sign_in_tokens"] = {
        key: token
        for key, token in state["sign_in_tokens"].items()
        if token["expire_at"] > horizon and (token["status"] == "pending" or token["updated_at"] > horizon)
    }
    state["sessions"] = {
        key: session
        for key, session in state["sessions"].items()
        if session["expire_at"] > horizon and (session["status"] == ACTIVE or session["updated_at"] > horizon)
    }
    in_use = {session["client_id"] for session in state["sessions"].values()}
    state["clients"] = {
        key: client
        for key, client in state["clients"].items()
        if key in in_use or client["updated_at"] > horizon
    }


# ---- the changes the emulator makes ----------------------------------------------------------------------


def new_session(state: dict[str, Any], now: int, *, client_id: str, user_id: str) -> dict[str, Any]:
    session = {
        "object": "session",
        "id": new_id("sess_"),
        "client_id": client_id,
        "user_id": user_id,
        "status": ACTIVE,
        "last_active_at": now,
        "expire_at": now + SESSION_LIFETIME_SECONDS * 1000,
        "abandon_at": now + SESSION_LIFETIME_SECONDS * 1000,
        "created_at": now,
        "updated_at": now,
    }
    state["sessions"][session["id"]] = session
    return session


def new_client(state: dict[str, Any], now: int) -> tuple[dict[str, Any], str]:
    """A new client and the secret its `__client` cookie carries (only its hash is kept)."""
    token = secrets.token_urlsafe(32)
    client = {"id": new_id("client_"), "token_hash": secret_hash(token), "created_at": now, "updated_at": now}
    state["clients"][client["id"]] = client
    return client, token


def end_session(
    state: dict[str, Any], now: int, session_id: str, status: str = REVOKED
) -> dict[str, Any] | None:
    session = state["sessions"].get(session_id)
    if session is None:
        return None
    if session["status"] == ACTIVE:
        session.update(status=status, updated_at=now)
    return session


def end_sessions_of_user(state: dict[str, Any], now: int, user_id: str) -> int:
    ended = 0
    for session in state["sessions"].values():
        if session["user_id"] == user_id and session["status"] == ACTIVE:
            session.update(status=REVOKED, updated_at=now)
            ended += 1
    return ended


__all__ = [
    "ACTIVE",
    "EXPIRED",
    "REVOKED",
    "SESSION_LIFETIME_SECONDS",
    "SESSION_TOKEN_SECONDS",
    "STORE_FILE",
    "FrontendSettings",
    "SessionStore",
    "mint_session_token",
]
