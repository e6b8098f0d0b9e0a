"""Signing in and out.

Live mode mounts Clerk's own sign-in component (ClerkJS sets the `__session` cookie). Sandbox mode has a
plain form: the user is found or created in the Clerk emulator through the real SDK, and the cookie holds a
token signed with the sandbox key pair, verified by the very same middleware as a real Clerk token.
"""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from clerk_backend_api import Clerk
from clerk_backend_api.models import ClerkBaseError, SDKError
from litestar import Controller, Request, get, post
from litestar.datastructures import Cookie, State
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotFoundException
from litestar.params import Body, FromQuery
from litestar.response import Redirect, Template

from app.auth import (
    SANDBOX_SESSION_TTL_SECONDS,
    SESSION_COOKIE,
    SignedInUser,
    mint_sandbox_session_token,
    safe_redirect_target,
)
from app.clerk import find_or_create_user_by_email
from app.settings import Settings

log = logging.getLogger(__name__)


class SignInForm(msgspec.Struct):
    email: str
    next: str = "/studio"


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
        request: Request,
        settings: NamedDependency[Settings],
        state: State,
        data: Annotated[SignInForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Template | Redirect:
        if not settings.is_sandbox:
            # Live sign-in belongs to Clerk's hosted component; there is nothing to post here.
            raise NotFoundException
        target = safe_redirect_target(data.next)
        clerk: Clerk = state.clerk
        try:
            user = await find_or_create_user_by_email(clerk, data.email)
        except ValueError as exc:
            return Template(
                "sign_in.html",
                context={"next": target, "error": str(exc), "email": data.email},
                status_code=400,
            )
        except (ClerkBaseError, SDKError):
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
        token = mint_sandbox_session_token(settings, user.id)
        return Redirect(
            path=target,
            status_code=303,
            cookies=[
                Cookie(
                    key=SESSION_COOKIE,
                    value=token,
                    max_age=SANDBOX_SESSION_TTL_SECONDS,
                    httponly=True,
                    samesite="lax",
                    secure=settings.app_url.startswith("https://"),
                    path="/",
                )
            ],
        )

    @post("/sign-out", status_code=303)
    async def sign_out(self) -> Redirect:
        return Redirect(
            path="/",
            status_code=303,
            cookies=[Cookie(key=SESSION_COOKIE, value="", max_age=0, expires=0, path="/", httponly=True)],
        )
