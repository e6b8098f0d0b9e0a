"""Response headers that every response gets, the CSRF configuration and the request body limit.

The Content-Security-Policy allows scripts from this origin only, plus ClerkJS's Frontend API host and
Clerk's bot and fraud protection in live mode; WebSocket connections may go to the GPU worker's origin.

The headers are added by a `before_send` hook rather than a middleware: Litestar's router answers unknown
paths (404), wrong methods (405) and errors raised in middleware (CSRF's 403) outside the middleware
stack, and those answers need the headers as much as any page.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from litestar.config.csrf import CSRFConfig
from litestar.datastructures import MutableScopeHeaders
from litestar.types import Message, Scope

from app.settings import SANDBOX_CLERK_PREFIX, Settings

# Machine-to-machine endpoints authenticate their own way (Basic auth, signed reports, API keys).
CSRF_EXEMPT = [
    "/api/webhooks/",
    "/api/usage/report",
    "/api/stream/claim",
    SANDBOX_CLERK_PREFIX,
    "/sandbox/chargebee/api/",
]

# The largest request body any endpoint takes unless it sets its own limit: the forms (sign-in, checkout,
# portal), the stream ticket and the sandbox emulators' APIs are a few KB at most (Clerk caps user metadata
# at 8 KB). Litestar refuses a larger body with 413 before reading it: an announced Content-Length is
# checked up front, a chunked body as it arrives. The webhook and the usage report set their own.
MAX_REQUEST_BODY_BYTES = 64 * 1024

# Clerk's bot and fraud protection (ClerkJS loads it since mid-2026). It connects on ports other than 443,
# and a CSP source without a port matches 443 only, hence `:*` for connect-src.
CLERK_PROTECT = "https://*.protect.clerk.com"


def csrf_config(settings: Settings) -> CSRFConfig:
    return CSRFConfig(
        secret=settings.csrf_secret,
        cookie_name="stylecast_csrf",
        header_name="x-csrftoken",
        cookie_secure=settings.app_url.startswith("https://"),
        cookie_samesite="lax",
        exclude=[f"^{prefix}" for prefix in CSRF_EXEMPT],
    )


def content_security_policy(settings: Settings) -> str:
    connect = ["'self'"]
    script = ["'self'"]
    img = ["'self'", "data:", "blob:"]
    frame = ["'none'"]
    # A form post to checkout answers with a redirect to the hosted page; form-action covers redirects.
    form = ["'self'"]
    if not settings.is_sandbox:
        form.append(f"https://{settings.chargebee_site}.{settings.chargebee_domain}")
    if settings.inference_url:
        parts = urlsplit(settings.inference_url)
        connect.append(f"{parts.scheme}://{parts.netloc}")
    else:
        app = urlsplit(settings.app_url)
        connect.append(f"{'wss' if app.scheme == 'https' else 'ws'}://{app.netloc}")
    if settings.clerk_frontend_api:
        clerk = f"https://{settings.clerk_frontend_api}"
        script += [clerk, "https://challenges.cloudflare.com", CLERK_PROTECT]
        connect += [clerk, f"{CLERK_PROTECT}:*"]
        img += ["https://img.clerk.com"]
        frame = ["https://challenges.cloudflare.com", CLERK_PROTECT]
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src {' '.join(script)}",
            # ClerkJS injects its own styles; ours are a static file.
            "style-src 'self' 'unsafe-inline'",
            f"img-src {' '.join(img)}",
            f"connect-src {' '.join(connect)}",
            f"frame-src {' '.join(frame)}",
            "worker-src 'self' blob:",
            "media-src 'self' blob:",
            "object-src 'none'",
            "base-uri 'self'",
            f"form-action {' '.join(form)}",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders:
    """A `before_send` hook: the security headers on every HTTP response the app sends.

    Responses that say nothing about caching get `Cache-Control: no-store`: pages, partials and API answers
    depend on who is signed in (plans, usage, stream tickets, checkout links, CSRF tokens), and a shared
    proxy must never hand one person's answer to another. Static files set their own policy.
    """

    def __init__(self, settings: Settings) -> None:
        self.headers = {
            "Content-Security-Policy": content_security_policy(settings),
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "strict-origin-when-cross-origin",
            "Permissions-Policy": "camera=(self), microphone=(), geolocation=()",
            "Cross-Origin-Opener-Policy": "same-origin",
            "Cache-Control": "no-store",
        }
        if settings.app_url.startswith("https://"):
            self.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"

    async def __call__(self, message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        headers = MutableScopeHeaders.from_message(message)
        for name, value in self.headers.items():
            if name not in headers:
                headers[name] = value
