"""Who is asking: Clerk session tokens verified on the server, the refresh step, and the guard.

Live and sandbox share this path. The `__session` cookie holds a session token that lives 60 seconds (set
by ClerkJS in live mode, by the sandbox Frontend API otherwise). It is verified with
`clerk_backend_api.authenticate_request_async` against the PEM key, so no request costs a network call;
only session tokens are accepted (never API keys or machine tokens, which the SDK would check with Clerk
over the network), they must be for this app's origin (`azp`), from our Clerk instance (`iss`) and carry
an expiry.

A token that has expired, or is missing, does not mean the person signed out: their browser refreshes it
only while a tab is open. Clerk's `__client_uat` cookie says whether the browser still has a signed-in
client (non-zero). For a page request in that state the middleware answers with a small page that lets
the browser refresh its token (ClerkJS in live mode, /static/sandbox_clerk.js in sandbox) and load the
page again; only when the refresh says "signed out" does the person land on the sign-in page. Requests
from scripts (htmx, the studio's fetches) get a plain 401, and the page's script refreshes and retries.

In sandbox mode the middleware also refuses the unexpired token of a session the emulator has ended
(sign-out, a deleted user), reading the emulator's session file, which every app process shares. Live
Clerk has no such check without a network call per request: there the 60-second life is the revocation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import jwt
import msgspec
from clerk_backend_api.security import authenticate_request_async
from clerk_backend_api.security.types import (
    AuthenticateRequestOptions,
    AuthStatus,
    TokenVerificationErrorReason,
)
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.enums import MediaType, ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.response import Redirect
from litestar.status_codes import HTTP_401_UNAUTHORIZED
from litestar.types import ASGIApp, Receive, Scope, Send

from app.settings import SANDBOX_CLERK_PREFIX, Settings
from sandbox import clerk_sessions
from sandbox.clerk_sessions import FrontendSettings, SessionStore

log = logging.getLogger(__name__)

SESSION_COOKIE = "__session"
CLIENT_UAT_COOKIE = "__client_uat"
# Counts refresh pages served in a short window, so a token that refreshes but still fails to verify (a
# clock far off, a misconfigured origin) ends on the sign-in page instead of reloading forever.
REFRESH_ATTEMPTS_COOKIE = "stylecast_session_refresh"
MAX_REFRESH_ATTEMPTS = 3
REFRESH_ATTEMPTS_WINDOW_SECONDS = 30
# Where a refresh page is never served: scripts, machines and the sandbox's emulated vendors.
_NO_REFRESH_PREFIXES = ("/api/", "/partials/", "/static/", "/sandbox/", "/health")


class SignedInUser(msgspec.Struct, frozen=True):
    user_id: str
    session_id: str


class SignInRequired(Exception):
    """Raised by the guard; turned into a redirect or a 401 by `sign_in_required_handler`.

    It is an expected answer, not a failure: `status_code` 401 is in the app's `disable_stack_trace`, so
    Litestar does not log it as an error with a traceback (anyone could flood the log otherwise)."""

    status_code = HTTP_401_UNAUTHORIZED


class SessionEnded(SignInRequired):
    """The session's user no longer exists in Clerk: the browser's session cookies are cleared."""


class _Verdict(msgspec.Struct, frozen=True):
    user: SignedInUser | None
    # "signed-in", "missing", "expired", "revoked" (sandbox: the emulator ended it) or "invalid".
    state: str
    issued_at: int = 0


def sandbox_issuer(settings: Settings) -> str:
    """The `iss` of sandbox session tokens: the sandbox Frontend API's address as browsers reach it (Clerk
    names its Frontend API URL), the same for every process serving the app's origin."""
    return f"{settings.app_url}{SANDBOX_CLERK_PREFIX.rsplit('/v1', 1)[0]}"


def expected_issuer(settings: Settings) -> str:
    """Clerk puts its Frontend API URL in `iss`; a token from any other instance is not ours."""
    if settings.is_sandbox:
        return sandbox_issuer(settings)
    return f"https://{settings.clerk_frontend_api}"


def sandbox_frontend(settings: Settings) -> FrontendSettings:
    """What the sandbox Frontend API signs and sets cookies with (sandbox mode only)."""
    if settings.sandbox_jwt_private_key is None:
        raise RuntimeError("the sandbox Frontend API exists only in sandbox mode")
    return FrontendSettings(
        signing_key=settings.sandbox_jwt_private_key,
        issuer=sandbox_issuer(settings),
        origin=settings.app_url,
        secure_cookies=settings.app_url.startswith("https://"),
    )


def client_uat(connection: ASGIConnection) -> int:
    """Clerk's `__client_uat` cookie: when the browser's client last signed in, 0 when it is signed out."""
    try:
        return max(0, int(connection.cookies.get(CLIENT_UAT_COOKIE, "0")))
    except ValueError:
        return 0


class VerifiedTokens:
    """Session tokens this process has verified, with their claims, until each one's `exp`.

    A studio tab presents the same token on every poll for the token's minute of life; checking its RS256
    signature and claims once instead of on each request is most of what a poll costs. The memo holds
    only what the token itself proves (a pure function of the token and the key), so it is right in every
    process; revocation and everything else about the session is still checked on each request."""

    def __init__(self, capacity: int = 20_000, clock: Callable[[], float] = time.time) -> None:
        self._capacity = capacity
        self._clock = clock
        self._claims: dict[str, dict[str, Any]] = {}

    def get(self, token: str) -> dict[str, Any] | None:
        claims = self._claims.get(token)
        if claims is None:
            return None
        if self._clock() >= claims["exp"]:
            del self._claims[token]
            return None  # verified afresh, which says why it no longer counts
        return claims

    def add(self, token: str, claims: dict[str, Any]) -> None:
        if len(self._claims) >= self._capacity:
            now = self._clock()
            self._claims = {key: value for key, value in self._claims.items() if value["exp"] > now}
            while len(self._claims) >= self._capacity:
                del self._claims[next(iter(self._claims))]  # the oldest
        self._claims[token] = claims

    def __len__(self) -> int:
        return len(self._claims)


class SessionMiddleware(ASGIMiddleware):
    """Attaches the verified user (or None) to every HTTP request as `request.user`, and answers a page
    request whose token needs refreshing with the refresh page.

    Only the `__session` cookie identifies a person. Machine callers (the SDKs calling the emulators,
    ChargeBee's webhooks, the worker's reports) send Authorization headers of their own, which the Clerk
    helper would otherwise try to verify as session tokens on every one of their requests."""

    scopes = (ScopeType.HTTP,)

    @staticmethod
    def should_bypass_for_scope(scope: Scope) -> bool:
        return str(scope["path"]).startswith("/static/")

    def __init__(self, settings: Settings) -> None:
        self.options = AuthenticateRequestOptions(
            jwt_key=settings.clerk_jwt_key,
            authorized_parties=[settings.app_url],
            accepts_token=["session_token"],
        )
        self.issuer = expected_issuer(settings)
        self.secure_cookies = settings.app_url.startswith("https://")
        self.revocations = (
            SessionStore(settings.state_dir / clerk_sessions.STORE_FILE) if settings.is_sandbox else None
        )
        self.verified = VerifiedTokens()

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        connection: ASGIConnection = ASGIConnection(scope)
        verdict = await self.verify(connection)
        scope["user"] = verdict.user
        if self._wants_refresh(connection, verdict):
            await self._refresh_page(connection).to_asgi_response(app=None, request=Request(scope))(
                scope, receive, send
            )
            return
        await next_app(scope, receive, send)

    async def verify(self, connection: ASGIConnection) -> _Verdict:
        token = connection.cookies.get(SESSION_COOKIE)
        if not token:
            return _Verdict(None, "missing")
        claims = self.verified.get(token)
        if claims is None:
            state = await authenticate_request_async(_SessionCookie(token), self.options)
            if state.status is not AuthStatus.SIGNED_IN or not state.payload:
                log.debug("session rejected: %s", state.reason)
                expired = state.reason is TokenVerificationErrorReason.TOKEN_EXPIRED
                return _Verdict(None, "expired" if expired else "invalid")
            claims = state.payload
            if not self._of_this_instance(claims):
                log.debug("session rejected: not a session token of this Clerk instance")
                return _Verdict(None, "invalid")
            self.verified.add(token, claims)
        subject, session_id = str(claims["sub"]), str(claims["sid"])
        if self.revocations is not None:
            if not self.revocations.is_current():
                await asyncio.to_thread(self.revocations.state)
            if self.revocations.refuses(session_id):
                return _Verdict(None, "revoked")
        issued_at = claims.get("iat")
        return _Verdict(
            SignedInUser(user_id=subject, session_id=session_id),
            "signed-in",
            issued_at if isinstance(issued_at, int) else 0,
        )

    def _of_this_instance(self, claims: dict[str, Any]) -> bool:
        subject, session_id = claims.get("sub"), claims.get("sid")
        return (
            isinstance(claims.get("exp"), int)
            and claims.get("iss") == self.issuer
            and isinstance(subject, str)
            and bool(subject)
            and isinstance(session_id, str)
            and bool(session_id)
        )

    def _wants_refresh(self, connection: ASGIConnection, verdict: _Verdict) -> bool:
        uat = client_uat(connection)
        if uat == 0 or not _is_page_navigation(connection):
            return False
        # A valid token older than the client's last sign-in belongs to a session the browser replaced
        # (signed in again, maybe as someone else, in another tab).
        stale = verdict.user is not None and verdict.issued_at < uat
        if verdict.state not in ("missing", "expired", "revoked") and not stale:
            return False
        return _refresh_attempts(connection) < MAX_REFRESH_ATTEMPTS

    def _refresh_page(self, connection: ASGIConnection) -> Response[bytes]:
        app = connection.scope["litestar_app"]
        # Signed out after all: the sign-in page, which itself leads back here.
        if connection.url.path == "/sign-in":
            sign_in_url = f"/sign-in?{connection.url.query}" if connection.url.query else "/sign-in"
        else:
            sign_in_url = f"/sign-in?next={_next_of(connection)}"
        page = app.template_engine.get_template("session_refresh.html").render(sign_in_url=sign_in_url)
        attempts = Cookie(
            key=REFRESH_ATTEMPTS_COOKIE,
            value=str(_refresh_attempts(connection) + 1),
            max_age=REFRESH_ATTEMPTS_WINDOW_SECONDS,
            httponly=True,
            samesite="lax",
            secure=self.secure_cookies,
            path="/",
        )
        # 401: the page asked for is not in this answer, and nothing may cache it.
        return Response(
            content=page.encode(),
            status_code=HTTP_401_UNAUTHORIZED,
            media_type=MediaType.HTML,
            headers={"Cache-Control": "no-store"},
            cookies=[attempts],
        )


def _is_page_navigation(connection: ASGIConnection) -> bool:
    """A browser loading a page (what Clerk's handshake is for), not a script's request."""
    if connection.scope.get("method") not in ("GET", "HEAD"):
        return False
    if connection.headers.get("hx-request") == "true" or connection.url.path.startswith(_NO_REFRESH_PREFIXES):
        return False
    destination = connection.headers.get("sec-fetch-dest")
    if destination is not None:
        return destination == "document"
    return "text/html" in connection.headers.get("accept", "")


def _refresh_attempts(connection: ASGIConnection) -> int:
    try:
        return max(0, int(connection.cookies.get(REFRESH_ATTEMPTS_COOKIE, "0")))
    except ValueError:
        return MAX_REFRESH_ATTEMPTS


class _SessionCookie:
    """The one header `authenticate_request` should look at: the session cookie, nothing else."""

    def __init__(self, token: str) -> None:
        self.headers = {"cookie": f"{SESSION_COOKIE}={token}"}


async def requires_user(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard for pages and APIs that need a signed-in user. Async: Litestar runs a sync guard in a worker
    thread, a thread hop for every meter poll."""
    if connection.scope.get("user") is None:
        raise SignInRequired


async def provide_user(request: Request) -> SignedInUser:
    """Dependency for handlers behind `requires_user`."""
    user = request.scope.get("user")
    if not isinstance(user, SignedInUser):
        raise SignInRequired
    return user


async def provide_optional_user(request: Request) -> SignedInUser | None:
    user = request.scope.get("user")
    return user if isinstance(user, SignedInUser) else None


def authentic_session_id(settings: Settings, token: str | None) -> str | None:
    """The session a token was issued for, when the token is genuinely ours, expired or not.

    For sign-out only: ending a session is all a stale token can be used for."""
    if not token:
        return None
    try:
        claims = jwt.decode(
            token,
            settings.clerk_jwt_key,
            algorithms=["RS256"],
            issuer=expected_issuer(settings),
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": ["sid"]},
        )
    except jwt.PyJWTError:
        return None
    session_id = claims.get("sid")
    if claims.get("azp") != settings.app_url or not isinstance(session_id, str):
        return None
    return session_id


def signed_out_cookies(settings: Settings) -> list[Cookie]:
    """What signs a browser out on the app's side: no session token and, in sandbox mode, the client marked
    signed out. Live Clerk keeps `__client_uat` itself (in production on the parent domain, where a
    host-only copy from us would sit beside it), and ClerkJS updates it when the session is found ended."""
    cookies = [Cookie(key=SESSION_COOKIE, value="", max_age=0, expires=0, path="/", httponly=True)]
    if settings.is_sandbox:
        cookies.append(
            Cookie(
                key=CLIENT_UAT_COOKIE,
                value="0",
                max_age=clerk_sessions.CLIENT_UAT_COOKIE_SECONDS,
                path="/",
                samesite="lax",
                secure=settings.app_url.startswith("https://"),
            )
        )
    return cookies


def sign_in_required_handler(request: Request, exc: SignInRequired) -> Response:
    """A request without a usable session: 401 JSON for the API, a bare 401 for scripts (htmx, fetch),
    which refresh the token and try again rather than navigate away from a live stream, and a redirect to
    the sign-in page for a page load. A session whose user is gone is also signed out of the browser."""
    cookies = signed_out_cookies(request.app.state.settings) if isinstance(exc, SessionEnded) else []
    if request.url.path.startswith("/api/"):
        return Response(
            {"error": "unauthenticated", "message": "Sign in to use this endpoint."},
            status_code=HTTP_401_UNAUTHORIZED,
            cookies=cookies,
        )
    if request.headers.get("hx-request") == "true":
        return Response(b"", status_code=HTTP_401_UNAUTHORIZED, cookies=cookies)
    return Redirect(path=f"/sign-in?next={_next_of(request)}", cookies=cookies)


def _next_of(connection: ASGIConnection) -> str:
    path = connection.url.path
    if connection.url.query:
        path = f"{path}?{connection.url.query}"
    return quote(path, safe="/")


def safe_redirect_target(candidate: str | None, default: str = "/studio") -> str:
    """Only same-site absolute paths: never let `?next=` send someone to another site."""
    if not candidate or not candidate.startswith("/") or candidate.startswith("//") or "\\" in candidate:
        return default
    return candidate


def mint_sandbox_session_token(
    settings: Settings, user_id: str, *, now: float | None = None, session_id: str | None = None
) -> str:
    """A session token as the sandbox Frontend API mints it, for a session the emulator may not know
    (tests use it to present tokens of their choosing). Sandbox mode only."""
    frontend = sandbox_frontend(settings)
    return clerk_sessions.mint_session_token(
        frontend.signing_key,
        issuer=frontend.issuer,
        authorized_party=frontend.origin,
        user_id=user_id,
        session_id=session_id or clerk_sessions.new_id("sess_"),
        now=now if now is not None else time.time(),
    )


__all__ = [
    "CLIENT_UAT_COOKIE",
    "SESSION_COOKIE",
    "SessionEnded",
    "SessionMiddleware",
    "SignInRequired",
    "SignedInUser",
    "VerifiedTokens",
    "authentic_session_id",
    "expected_issuer",
    "mint_sandbox_session_token",
    "provide_optional_user",
    "provide_user",
    "requires_user",
    "safe_redirect_target",
    "sandbox_frontend",
    "sign_in_required_handler",
    "signed_out_cookies",
]
