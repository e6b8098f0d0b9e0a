"""The web app's wiring, in one place: what a `Settings` turns into.

`Stylecast` (an init plugin, the only one `create_app` registers) adds the routes, middleware, templates
and error handlers, the dependencies handlers ask for by name, and one lifespan that builds the shared
services when the app starts and closes them when it stops. Whatever only some deployments have is
decided here too: the sandbox emulators (sandbox mode) and the GPU worker served in-process (no
INFERENCE_URL).

What handlers get, by name, and where it lives on `app.state`:

* `settings`: `app.settings.Settings`
* `user`, `maybe_user`: the signed-in user (app/auth.py), from the request
* `clerk`: the Clerk SDK client (async; closed on shutdown)
* `catalogue`: `billing.plans.PlanCatalogue`
* `accounts`: `billing.accounts.AccountStore` (cached Clerk metadata)
* `ledger`: `billing.ledger_store.LedgerStore` (reservations, claims, usage reports)
* `subscriptions`: `app.subscriptions.Subscriptions` (checkout, portal, read-backs)

and, beside them, `chargebee` (the ChargeBee SDK client), `worker`, `clerk_emulator` and
`chargebee_emulator` where the deployment has them. Providers read `app.state` on each request.

Route modules import none of this and none of each other: they declare what they need by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final, TypeVar

from chargebee import Chargebee
from clerk_backend_api import Clerk
from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.datastructures import CacheControlHeader, State
from litestar.di import Provide
from litestar.logging.config import LoggingConfig
from litestar.openapi.config import OpenAPIConfig
from litestar.plugins import InitPlugin
from litestar.plugins.htmx import HTMXPlugin, HTMXRequest
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from app.auth import (
    SessionMiddleware,
    SignInRequired,
    provide_optional_user,
    provide_user,
    sandbox_frontend,
    sign_in_required_handler,
)
from app.clerk import create_clerk_client
from app.routes.chargebee_webhooks import WEBHOOK_PATH, ChargebeeWebhookController
from app.routes.pages import PagesController
from app.routes.plans import PlansController
from app.routes.session import SessionController
from app.routes.stream import StreamController
from app.routes.usage_meter import UsageMeterController
from app.routes.worker_requests import WorkerRequestsController
from app.security import SecurityHeaders, csrf_config
from app.settings import SANDBOX_CHARGEBEE_PREFIX, SANDBOX_CLERK_PREFIX, Settings
from app.subscriptions import Subscriptions
from billing.accounts import AccountStore
from billing.chargebee_client import ChargebeeConfig, create_chargebee_client
from billing.ledger_store import LedgerStore
from billing.plans import CatalogueConfig, PlanCatalogue
from inference.config import load_worker_config
from inference.server import worker_router
from inference.worker import Worker
from sandbox.chargebee_emulator import ChargebeeEmulator, SandboxItemPrice, price_in_minor_units
from sandbox.clerk_emulator import ClerkEmulator

PACKAGE_DIR = Path(__file__).parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"

_T = TypeVar("_T")


def plan_catalogue(settings: Settings) -> PlanCatalogue:
    """The deployment's plans: the Free allowance and the ChargeBee item prices it sells."""
    return PlanCatalogue.from_config(
        CatalogueConfig(
            free_plan_seconds=settings.free_plan_seconds,
            pro_item_price_id=settings.chargebee_item_price_pro,
            ultra_item_price_id=settings.chargebee_item_price_ultra,
            pro_price_display=settings.price_pro_display,
            ultra_price_display=settings.price_ultra_display,
        )
    )


def chargebee_config(settings: Settings) -> ChargebeeConfig:
    """The ChargeBee site the settings name: the real one, or the sandbox emulator on this app's port."""
    protocol = "http" if settings.chargebee_protocol == "http" else "https"
    return ChargebeeConfig(
        site=settings.chargebee_site,
        api_key=settings.chargebee_api_key,
        domain=settings.chargebee_domain,
        protocol=protocol,
    )


IN_PROCESS_STOP_GRACE_SECONDS: Final = 1.0


def in_process_worker(settings: Settings) -> Worker:
    """The GPU worker served by the app itself when no INFERENCE_URL is set.

    Worker-only knobs (PREVIEW_DELAY_MS, FLUX2_MODEL_PATH, MODEL_CACHE_DIR, ...) are read from the same
    environment by the worker's own settings loader; what the app decides is passed explicitly.
    """
    environ = {**os.environ, "STREAM_SECRET": settings.stream_secret}
    config = load_worker_config(
        environ,
        engine=settings.inference_engine,
        usage_report_url=settings.usage_report_url,
        worker_id=f"in-process-{settings.port}",
    )
    return Worker(config)


def sandbox_clerk(settings: Settings) -> ClerkEmulator:
    """The Clerk emulator the sandbox's Clerk client and browsers talk to, at SANDBOX_CLERK_PREFIX."""
    return ClerkEmulator(
        settings.state_dir / "clerk-users.json",
        settings.clerk_secret_key,
        frontend=sandbox_frontend(settings),
        api_path=SANDBOX_CLERK_PREFIX,
    )


def sandbox_chargebee(settings: Settings, catalogue: PlanCatalogue) -> ChargebeeEmulator:
    """The ChargeBee emulator selling the catalogue's paid plans, posting its webhooks to this app."""
    return ChargebeeEmulator(
        settings.state_dir / "chargebee.json",
        mount_path=SANDBOX_CHARGEBEE_PREFIX,
        api_key=settings.chargebee_api_key,
        public_url=settings.app_url,
        webhook_url=f"{settings.internal_url}{WEBHOOK_PATH}",
        webhook_username=settings.chargebee_webhook_username,
        webhook_password=settings.chargebee_webhook_password,
        item_prices=[
            SandboxItemPrice(
                id=plan.item_price_id or "",
                name=f"Stylecast {plan.name}",
                price_display=plan.price_display,
                unit_price=price_in_minor_units(plan.price_display),
            )
            for plan in catalogue.paid
        ],
    )


def _from_state(name: str, kind: type[_T]) -> Provide:
    """A dependency that hands handlers `app.state.<name>`, which the lifespan put there."""

    def provide(state: State) -> _T:
        value = state.get(name)
        if not isinstance(value, kind):
            raise RuntimeError(f"app.state.{name} is not set: the app's lifespan has not run")
        return value

    return Provide(provide, sync_to_thread=False)


class Stylecast(InitPlugin):
    """Everything `create_app` registers, from one `Settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalogue = plan_catalogue(settings)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        settings = self.settings
        # httpx logs every request at INFO: the SDKs' calls would drown the app's own log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        state = app_config.state
        state["settings"] = settings
        state["catalogue"] = self.catalogue
        app_config.route_handlers.extend(
            [
                PagesController,
                SessionController,
                StreamController,
                UsageMeterController,
                PlansController,
                ChargebeeWebhookController,
                WorkerRequestsController,
                # Not fingerprinted, so browsers revalidate (ETag) rather than keep a stale studio.js
                # after a deploy.
                create_static_files_router(
                    path="/static",
                    directories=[STATIC_DIR],
                    name="static",
                    cache_control=CacheControlHeader(no_cache=True),
                ),
            ]
        )
        if settings.is_sandbox:
            clerk_emulator = sandbox_clerk(settings)
            chargebee_emulator = sandbox_chargebee(settings, self.catalogue)
            state["clerk_emulator"] = clerk_emulator
            state["chargebee_emulator"] = chargebee_emulator
            app_config.route_handlers.extend([clerk_emulator.router, chargebee_emulator.router])
        if settings.inference_url is None:
            # No remote worker: serve the worker's /ws from this process (preview engine unless configured).
            worker = in_process_worker(settings)
            state["worker"] = worker
            app_config.route_handlers.append(worker_router(worker))

        app_config.dependencies.update(
            {
                "settings": _from_state("settings", Settings),
                "user": Provide(provide_user),
                "maybe_user": Provide(provide_optional_user),
                "clerk": _from_state("clerk", Clerk),
                "catalogue": _from_state("catalogue", PlanCatalogue),
                "accounts": _from_state("accounts", AccountStore),
                "ledger": _from_state("ledger", LedgerStore),
                "subscriptions": _from_state("subscriptions", Subscriptions),
            }
        )
        app_config.middleware.append(SessionMiddleware(settings))
        app_config.before_send.append(SecurityHeaders(settings))
        # The schema maps every endpoint; live mode serves it only when STYLECAST_OPENAPI asks for it.
        app_config.openapi_config = (
            OpenAPIConfig(title="Stylecast", version="1.0.0") if settings.openapi else None
        )
        app_config.csrf_config = csrf_config(settings)
        app_config.request_class = HTMXRequest
        app_config.plugins.append(HTMXPlugin())
        app_config.template_config = TemplateConfig(
            directory=TEMPLATES_DIR, engine=JinjaTemplateEngine, engine_callback=self._template_globals
        )
        app_config.exception_handlers[SignInRequired] = sign_in_required_handler
        app_config.lifespan.append(self.lifespan)
        app_config.logging_config = LoggingConfig(
            root={"level": settings.log_level, "handlers": ["queue_listener"]},
            log_exceptions="always",
            disable_stack_trace={401, 403, 404, 405, 429},
        )
        return app_config

    def _template_globals(self, engine: JinjaTemplateEngine) -> None:
        settings = self.settings
        engine.engine.globals.update(
            sandbox=settings.is_sandbox,
            clerk_publishable_key=settings.clerk_publishable_key if not settings.is_sandbox else None,
            clerk_frontend_api=settings.clerk_frontend_api,
        )

    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        settings = self.settings
        state = app.state
        worker: Worker | None = state.get("worker")
        chargebee_emulator: ChargebeeEmulator | None = state.get("chargebee_emulator")
        async with AsyncExitStack() as stack:
            # The SDK client owns its httpx connection pools; leaving the context closes them.
            clerk: Clerk = await stack.enter_async_context(
                create_clerk_client(settings.clerk_secret_key, settings.clerk_api_url)
            )
            state.clerk = clerk
            if worker is not None:
                await worker.start()
                # By the time the lifespan ends, this process's server has stopped listening, so a final
                # usage report still being retried cannot reach the app: a short grace, not the 10 s a
                # remote worker gives a restarting app (the sandbox's Ctrl-C waited for nothing).
                stack.push_async_callback(worker.stop, IN_PROCESS_STOP_GRACE_SECONDS)
            accounts = AccountStore(clerk)
            chargebee: Chargebee = create_chargebee_client(chargebee_config(settings))
            state.accounts = accounts
            state.chargebee = chargebee
            state.ledger = LedgerStore(accounts, self.catalogue)
            state.subscriptions = Subscriptions(
                chargebee=chargebee,
                accounts=accounts,
                catalogue=self.catalogue,
                app_url=settings.app_url,
                return_link_secret=settings.csrf_secret,
            )
            if chargebee_emulator is not None:
                chargebee_emulator.start()
                stack.push_async_callback(chargebee_emulator.aclose)
            yield
