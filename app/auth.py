"""Who is asking: Clerk session tokens verified on the server, and the guard for protected routes.

Live and sandbox share this path. The `__session` cookie (set by ClerkJS in live mode, by the sandbox
sign-in form otherwise) is verified with `clerk_backend_api.authenticate_request_async` against the PEM
key, so no request costs a network call, and `authorized_parties` pins tokens to this app's origin.
"""

from __future__ import annotations

import logging
import time
import uuid

import jwt
import msgspec
from clerk_backend_api.security import authenticate_request_async
from clerk_backend_api.security.types import AuthenticateRequestOptions, AuthStatus
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.response import Redirect
from litestar.status_codes import HTTP_401_UNAUTHORIZED
from litestar.types import ASGIApp, Receive, Scope, Send

from app.settings import SANDBOX_CLERK_PREFIX, Settings

log = logging.getLogger(__name__)

SESSION_COOKIE = "__session"
# Sandbox sessions have no ClerkJS to refresh them every minute, so they live for a working day.
SANDBOX_SESSION_TTL_SECONDS = 12 * 3600


class SignedInUser(msgspec.Struct, frozen=True):
    user_id: str
    session_id: str


class SignInRequired(Exception):
    """Raised by the guard; turned into a redirect, an HX-Redirect or a 401 by `sign_in_required_handler`."""


class SessionMiddleware(ASGIMiddleware):
    """Attaches the verified user (or None) to every HTTP request as `request.user`.

    Only the `__session` cookie identifies a person. Machine callers (the SDKs calling the emulators,
    ChargeBee's webhooks, the worker's reports) send Authorization headers of their own, which the Clerk
    helper would otherwise try to verify as session tokens on every one of their requests."""

    scopes = (ScopeType.HTTP,)
    exclude_path_pattern = ("^/static/",)

    def __init__(self, settings: Settings) -> None:
        self.options = AuthenticateRequestOptions(
            jwt_key=settings.clerk_jwt_key, authorized_parties=[settings.app_url]
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        scope["user"] = await self.verify(ASGIConnection(scope))
        await next_app(scope, receive, send)

    async def verify(self, connection: ASGIConnection) -> SignedInUser | None:
        token = connection.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        state = await authenticate_request_async(_SessionCookie(token), self.options)
        if state.status is not AuthStatus.SIGNED_IN or not state.payload:
            log.debug("session rejected: %s", state.reason)
            return None
        subject = state.payload.get("sub")
        if not isinstance(subject, str) or not subject:
            return None
        return SignedInUser(user_id=subject, session_id=str(state.payload.get("sid", "")))


class _SessionCookie:
    """The one header `authenticate_request` should look at: the session cookie, nothing else."""

    def __init__(self, token: str) -> None:
        self.headers = {"cookie": f"{SESSION_COOKIE}={token}"}


def requires_user(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard for pages and APIs that need a signed-in user."""
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


def sign_in_required_handler(request: Request, _: SignInRequired) -> Response:
    target = "/sign-in"
    if request.url.path.startswith("/api/"):
        return Response(
            {"error": "unauthenticated", "message": "Sign in to use this endpoint."},
            status_code=HTTP_401_UNAUTHORIZED,
        )
    if request.headers.get("hx-request") == "true":
        # htmx follows HX-Redirect with a full page load, which is what a lost session needs.
        return Response(b"", status_code=HTTP_401_UNAUTHORIZED, headers={"HX-Redirect": target})
    return Redirect(path=f"{target}?next={_safe_next(request)}")


def _safe_next(request: Request) -> str:
    from urllib.parse import quote

    path = request.url.path
    if request.url.query:
        path = f"{path}?{request.url.query}"
    return quote(path, safe="/")


def safe_redirect_target(candidate: str | None, default: str = "/studio") -> str:
    """Only same-site absolute paths: never let `?next=` send someone to another site."""
    if not candidate or not candidate.startswith("/") or candidate.startswith("//") or "\\" in candidate:
        return default
    return candidate


def mint_sandbox_session_token(settings: Settings, user_id: str, *, now: float | None = None) -> str:
    """An RS256 session JWT shaped like Clerk's, signed with the sandbox key pair (sandbox mode only)."""
    if settings.sandbox_jwt_private_key is None:
        raise RuntimeError("sandbox session tokens can only be minted in sandbox mode")
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": user_id,
        "sid": f"sess_{uuid.uuid4().hex}",
        "azp": settings.app_url,
        "iss": f"{settings.internal_url}{SANDBOX_CLERK_PREFIX.rsplit('/v1', 1)[0]}",
        "iat": issued,
        "nbf": issued - 5,
        "exp": issued + SANDBOX_SESSION_TTL_SECONDS,
        "v": 2,
    }
    return jwt.encode(claims, settings.sandbox_jwt_private_key, algorithm="RS256", headers={"kid": "sandbox"})


__all__ = [
    "SESSION_COOKIE",
    "SessionMiddleware",
    "SignInRequired",
    "SignedInUser",
    "mint_sandbox_session_token",
    "provide_optional_user",
    "provide_user",
    "requires_user",
    "safe_redirect_target",
    "sign_in_required_handler",
]
