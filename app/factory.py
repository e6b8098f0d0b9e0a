"""`create_app()`: the whole web app from one `Settings`."""

from __future__ import annotations

import logging
from pathlib import Path

from litestar import Litestar
from litestar.datastructures import CacheControlHeader, State
from litestar.di import Provide
from litestar.logging.config import LoggingConfig
from litestar.openapi.config import OpenAPIConfig
from litestar.plugins.htmx import HTMXPlugin, HTMXRequest
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import ControllerRouterHandler

from app.auth import (
    SessionMiddleware,
    SignInRequired,
    provide_optional_user,
    provide_user,
    sandbox_frontend,
    sign_in_required_handler,
)
from app.routes.billing import BillingPlugin
from app.routes.pages import PagesController
from app.routes.session import SessionController
from app.routes.stream import StreamController
from app.routes.usage import UsageController
from app.security import MAX_REQUEST_BODY_BYTES, SecurityHeaders, csrf_config
from app.services import in_process_worker, services_lifespan
from app.settings import Settings, load_settings
from inference.server import worker_router

PACKAGE_DIR = Path(__file__).parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or load_settings()
    route_handlers: list[ControllerRouterHandler] = [
        PagesController,
        SessionController,
        StreamController,
        UsageController,
        # Not fingerprinted, so browsers revalidate (ETag) rather than keep a stale studio.js after a deploy.
        create_static_files_router(
            path="/static",
            directories=[STATIC_DIR],
            name="static",
            cache_control=CacheControlHeader(no_cache=True),
        ),
    ]
    state = State({"settings": settings})

    if settings.is_sandbox:
        from app.sandbox.clerk_emulator import ClerkEmulator

        clerk_emulator = ClerkEmulator(
            settings.state_dir / "clerk-users.json",
            settings.clerk_secret_key,
            frontend=sandbox_frontend(settings),
        )
        state["clerk_emulator"] = clerk_emulator
        route_handlers.append(clerk_emulator.router)

    if settings.inference_url is None:
        # No remote worker: serve the worker's /ws from this process (preview engine unless configured).
        worker = in_process_worker(settings)
        state["worker"] = worker
        route_handlers.append(worker_router(worker))

    def template_globals(engine: JinjaTemplateEngine) -> None:
        engine.engine.globals.update(
            sandbox=settings.is_sandbox,
            clerk_publishable_key=settings.clerk_publishable_key if not settings.is_sandbox else None,
            clerk_frontend_api=settings.clerk_frontend_api,
        )

    return Litestar(
        route_handlers=route_handlers,
        state=state,
        dependencies={
            "settings": Provide(lambda: settings, sync_to_thread=False),
            "user": Provide(provide_user),
            "maybe_user": Provide(provide_optional_user),
        },
        middleware=[SessionMiddleware(settings)],
        before_send=[SecurityHeaders(settings)],
        request_max_body_size=MAX_REQUEST_BODY_BYTES,
        # The schema maps every endpoint; live mode serves it only when STYLECAST_OPENAPI asks for it.
        openapi_config=OpenAPIConfig(title="Stylecast", version="1.0.0") if settings.openapi else None,
        csrf_config=csrf_config(settings),
        request_class=HTMXRequest,
        plugins=[HTMXPlugin(), BillingPlugin(settings)],
        template_config=TemplateConfig(
            directory=TEMPLATES_DIR, engine=JinjaTemplateEngine, engine_callback=template_globals
        ),
        exception_handlers={SignInRequired: sign_in_required_handler},
        lifespan=[services_lifespan],
        logging_config=LoggingConfig(
            root={"level": settings.log_level, "handlers": ["queue_listener"]},
            log_exceptions="always",
            disable_stack_trace={401, 403, 404, 405, 429},
        ),
    )


logging.getLogger("httpx").setLevel(logging.WARNING)
