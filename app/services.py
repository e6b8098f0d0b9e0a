"""Long-lived clients and workers the handlers share, opened and closed with the app."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from app.clerk import create_clerk_client
from app.settings import Settings
from inference.config import load_worker_config
from inference.worker import Worker


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


@asynccontextmanager
async def services_lifespan(app: Litestar) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    worker: Worker | None = app.state.get("worker")
    # The SDK client owns its httpx connection pools; leaving the context closes them on shutdown.
    async with create_clerk_client(settings.clerk_secret_key, settings.clerk_api_url) as clerk:
        app.state.clerk = clerk
        if worker is not None:
            await worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
