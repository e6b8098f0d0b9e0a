"""Response headers that every page gets, and the CSRF configuration.

The Content-Security-Policy allows scripts from this origin only, plus ClerkJS's Frontend API host in
live mode; WebSocket connections may go to the GPU worker's origin.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from litestar.config.csrf import CSRFConfig
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import SANDBOX_CLERK_PREFIX, Settings

# Machine-to-machine endpoints authenticate their own way (Basic auth, signed reports, API keys).
CSRF_EXEMPT = ["/api/webhooks/", "/api/usage/report", SANDBOX_CLERK_PREFIX, "/sandbox/chargebee/api/"]


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
        script += [clerk, "https://challenges.cloudflare.com"]
        connect += [clerk]
        img += ["https://img.clerk.com"]
        frame = ["https://challenges.cloudflare.com"]
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


class SecurityHeadersMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.headers = {
            "Content-Security-Policy": content_security_policy(settings),
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "strict-origin-when-cross-origin",
            "Permissions-Policy": "camera=(self), microphone=(), geolocation=()",
            "Cross-Origin-Opener-Policy": "same-origin",
        }
        if settings.app_url.startswith("https://"):
            self.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableScopeHeaders.from_message(message)
                for name, value in self.headers.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await next_app(scope, receive, send_with_headers)
