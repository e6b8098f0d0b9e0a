"""Signing in and out.

Live mode mounts Clerk's own sign-in component; ClerkJS talks to Clerk's Frontend API and keeps the
`__session` cookie fresh. Sandbox mode has a plain form instead, and does what Clerk's component does on
the server's side of it: the user is found or created in the Clerk emulator through the real SDK, the
Backend API issues a one-time sign-in token for them, and the sandbox Frontend API redeems it (over HTTP,
as a Frontend API proxy would), creating the browser's client and session. Its cookies (`__client`,
`__client_uat`, a 60-second `__session`) are passed on to the browser, which from then on refreshes the
token itself (/static/sandbox_clerk.js).

Signing out revokes the session through the Backend API, so neither the old token nor the client cookie
can be used again, and marks the browser's client signed out (`__client_uat=0`).
"""

from __future__ import annotations

import logging
from http.cookies import SimpleCookie
from typing import Annotated, Literal, cast

import httpx
import msgspec
from clerk_backend_api import Clerk
from clerk_backend_api.models import ClerkBaseError, SDKError
from litestar import Controller, Request, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotFoundException
from litestar.params import Body, FromQuery
from litestar.response import Redirect, Template

from app.auth import (
    SESSION_COOKIE,
    SignedInUser,
    authentic_session_id,
    safe_redirect_target,
    signed_out_cookies,
)
from app.clerk import find_or_create_user_by_email
from app.settings import SANDBOX_CLERK_PREFIX, Settings

log = logging.getLogger(__name__)

_SANDBOX_SIGN_INS = f"{SANDBOX_CLERK_PREFIX}/client/sign_ins"
# How long the sign-in token handed from the sign-in form to the sandbox Frontend API stays redeemable:
# it is redeemed by the same request that asked for it.
SIGN_IN_TOKEN_SECONDS = 60


class SignInForm(msgspec.Struct):
    email: str
    next: str = "/studio"


class SandboxSignInFailed(Exception):
    """The sandbox Frontend API did not complete the sign-in."""


class SessionController(Controller):
    tags = ["session"]

    @get("/sign-in", name="sign_in")
    async def sign_in_page(
        self,
        maybe_user: NamedDependency[SignedInUser | None],
        next: FromQuery[str] = "/studio",
    ) -> Template | Redirect:
        target = safe_redirect_target(next)
        if maybe_user is not None:
            return Redirect(path=target)
        return Template("sign_in.html", context={"next": target, "error": None, "email": ""})

    @post("/sign-in", status_code=303)
    async def sign_in(
        self,
        settings: NamedDependency[Settings],
        clerk: NamedDependency[Clerk],
        data: Annotated[SignInForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Template | Redirect:
        if not settings.is_sandbox:
            # Live sign-in belongs to Clerk's hosted component; there is nothing to post here.
            raise NotFoundException
        target = safe_redirect_target(data.next)
        try:
            user = await find_or_create_user_by_email(clerk, data.email)
            cookies = await _sandbox_sign_in(clerk, settings, user.id)
        except ValueError as exc:
            return Template(
                "sign_in.html",
                context={"next": target, "error": str(exc), "email": data.email},
                status_code=400,
            )
        except (ClerkBaseError, SDKError, httpx.HTTPError, SandboxSignInFailed):
            log.exception("sandbox sign-in could not reach the Clerk emulator")
            return Template(
                "sign_in.html",
                context={
                    "next": target,
                    "error": "Sign-in is unavailable right now. Try again.",
                    "email": data.email,
                },
                status_code=503,
            )
        return Redirect(path=target, status_code=303, cookies=cookies)

    @post("/sign-out", status_code=303)
    async def sign_out(
        self, request: Request, settings: NamedDependency[Settings], clerk: NamedDependency[Clerk]
    ) -> Redirect:
        # An expired token still names its session; sign-out must end it, or the browser's client
        # cookie could refresh it again.
        session_id = authentic_session_id(settings, request.cookies.get(SESSION_COOKIE))
        if session_id is not None:
            try:
                await clerk.sessions.revoke_async(session_id=session_id)
            except (ClerkBaseError, SDKError, httpx.HTTPError):
                log.warning("sign-out could not revoke session %s in Clerk", session_id, exc_info=True)
        return Redirect(path="/", status_code=303, cookies=signed_out_cookies(settings))


async def _sandbox_sign_in(clerk: Clerk, settings: Settings, user_id: str) -> list[Cookie]:
    """Sign `user_id` in at the sandbox Frontend API with a Backend API sign-in token; the cookies it set."""
    ticket = await clerk.sign_in_tokens.create_async(
        request={"user_id": user_id, "expires_in_seconds": SIGN_IN_TOKEN_SECONDS}
    )
    if not ticket.token:
        raise SandboxSignInFailed("the Backend API issued a sign-in token without its secret")
    # Our own socket: no proxy from the environment applies.
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as frontend:
        answer = await frontend.post(
            f"{settings.internal_url}{_SANDBOX_SIGN_INS}",
            data={"strategy": "ticket", "ticket": ticket.token},
            headers={"Origin": settings.app_url},
        )
    if answer.status_code != 200:
        raise SandboxSignInFailed(f"the sandbox Frontend API answered {answer.status_code}: {answer.text}")
    return [cookie for header in answer.headers.get_list("set-cookie") for cookie in _cookies(header)]


def _cookies(header: str) -> list[Cookie]:
    """A Set-Cookie header as Litestar cookies, attributes and all."""
    parsed: SimpleCookie = SimpleCookie()
    parsed.load(header)
    cookies = []
    for key, morsel in parsed.items():
        max_age = morsel["max-age"]
        samesite = (morsel["samesite"] or "lax").lower()
        cookies.append(
            Cookie(
                key=key,
                value=morsel.value,
                path=morsel["path"] or "/",
                max_age=int(max_age) if max_age else None,
                httponly=bool(morsel["httponly"]) or None,
                secure=bool(morsel["secure"]) or None,
                samesite=cast(Literal["lax", "strict", "none"], samesite),
            )
        )
    return cookies
