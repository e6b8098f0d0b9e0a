"""Long-lived clients the handlers share, opened and closed with the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from app.settings import Settings


@asynccontextmanager
async def services_lifespan(app: Litestar) -> AsyncIterator[None]:
    from app.clerk import create_clerk_client

    settings: Settings = app.state.settings
    app.state.clerk = create_clerk_client(settings.clerk_secret_key, settings.clerk_api_url)
    yield
