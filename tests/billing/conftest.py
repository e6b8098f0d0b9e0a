from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
from clerk_backend_api import Clerk
from litestar import Litestar

from app.clerk import create_clerk_client, find_or_create_user_by_email
from app.factory import create_app
from app.settings import SANDBOX_CLERK_PREFIX, Settings, load_settings
from app.wiring import plan_catalogue
from billing.metadata import BillingMetadata, decode_metadata
from billing.plans import PlanCatalogue
from sandbox.chargebee_emulator import ApiRequest, ChargebeeEmulator
from tests.live_server import free_port, serve

T = TypeVar("T")
CSRF_FIELD = re.compile(r'name="_csrf_token" value="([^"]+)"')


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(main())` on a thread of its own: a browser test earlier in the session leaves
    Playwright's event loop running on the main thread, where asyncio.run refuses to start."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


def sandbox_settings(state_dir: Path, **env: str) -> Settings:
    """Sandbox settings isolated from the developer's environment and `.env`."""
    return load_settings(environ=env, state_dir=state_dir, dotenv=None)


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> PlanCatalogue:
    return plan_catalogue(sandbox_settings(tmp_path_factory.mktemp("catalogue")))


@dataclass
class RunningApp:
    """The whole app (create_app) in sandbox mode under uvicorn, with its emulators, on a real socket."""

    settings: Settings
    url: str
    litestar: Litestar

    @property
    def chargebee(self) -> ChargebeeEmulator:
        """The app's sandbox ChargeBee, whose `api_log` shows every call the app made with its key."""
        emulator = self.litestar.state.chargebee_emulator
        assert isinstance(emulator, ChargebeeEmulator)
        return emulator

    def chargebee_calls(self) -> list[ApiRequest]:
        return list(self.chargebee.api_log)

    @property
    def clerk_url(self) -> str:
        return f"{self.url}{SANDBOX_CLERK_PREFIX}"

    def clerk(self, body: Callable[[Clerk], Awaitable[T]]) -> T:
        """Run `body` against the app's Clerk (emulator) with the official SDK, on a fresh loop."""

        async def main() -> T:
            async with create_clerk_client(self.settings.clerk_secret_key, self.clerk_url) as clerk:
                return await body(clerk)

        return run_async(main)

    def create_user(self, email: str) -> str:
        return self.clerk(lambda clerk: find_or_create_user_by_email(clerk, email)).id

    def metadata(self, user_id: str) -> BillingMetadata:
        async def read(clerk: Clerk) -> BillingMetadata:
            user = await clerk.users.get_async(user_id=user_id)
            return decode_metadata(user.public_metadata, user.private_metadata)

        return self.clerk(read)

    def raw_metadata(self, user_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        async def read(clerk: Clerk) -> tuple[dict[str, Any], dict[str, Any]]:
            user = await clerk.users.get_async(user_id=user_id)
            return dict(user.public_metadata or {}), dict(user.private_metadata or {})

        return self.clerk(read)

    def set_public(self, user_id: str, **fields: Any) -> None:
        """Change public billing fields the way the ledger store does (a deep-merge write)."""

        async def write(clerk: Clerk) -> None:
            await clerk.users.update_metadata_async(user_id=user_id, public_metadata={"billing": fields})

        self.clerk(write)

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=20)

    def sign_in(self, client: httpx.Client, email: str) -> None:
        response = client.post(
            "/sign-in", data={"email": email, "next": "/account", "_csrf_token": csrf(client)}
        )
        assert response.status_code == 303, response.text


def csrf(client: httpx.Client, path: str = "/sign-in") -> str:
    """The CSRF token a page's forms carry (and the cookie that goes with it)."""
    match = CSRF_FIELD.search(client.get(path).text)
    assert match, f"{path} has a form with a CSRF token"
    return match.group(1)


@contextmanager
def running_app(
    state_dir: Path, adjust: Callable[[Settings], Settings] | None = None, **env: str
) -> Iterator[RunningApp]:
    port = free_port()
    settings = sandbox_settings(state_dir, STYLECAST_PORT=str(port), **env)
    if adjust is not None:
        settings = adjust(settings)
    litestar = create_app(settings)
    with serve(litestar, port=port) as url:
        yield RunningApp(settings=settings, url=url, litestar=litestar)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[RunningApp]:
    with running_app(tmp_path / "state") as running:
        yield running


def replace_settings(**changes: Any) -> Callable[[Settings], Settings]:
    return lambda settings: msgspec.structs.replace(settings, **changes)
