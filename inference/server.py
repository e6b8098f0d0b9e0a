"""HTTP/WebSocket surface of the worker.

* `worker_router(worker)`: the `/ws` stream endpoint, for the standalone worker and for the web app, which
  mounts it in its own process in sandbox mode (and then starts/stops the Worker in its lifespan).
* `worker_ops_router(worker)`: `/health` and Prometheus `/metrics`.
* `create_inference_app(config)`: the standalone worker app, both routers plus the Worker's lifecycle.
* `WEBSOCKET_SERVER_OPTIONS`: the uvicorn settings of every server that carries `/ws`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import httpx
from litestar import Litestar, Response, Router, get, websocket
from litestar.connection import WebSocket
from litestar.datastructures import State

from inference.billable_time import Clock
from inference.config import WorkerConfig
from inference.engines.base import Engine
from inference.metrics import METRICS_CONTENT_TYPE
from inference.protocol import FRAME_HEADER_BYTES, MAX_FRAME_JPEG_BYTES, MAX_TEXT_MESSAGE_BYTES
from inference.worker import Worker, WorkerStatus

__all__ = [
    "WEBSOCKET_SERVER_OPTIONS",
    "Worker",
    "WorkerStatus",
    "create_inference_app",
    "worker_ops_router",
    "worker_router",
]

# Frames up to twice the limit still arrive and are answered with `frame_too_large`; anything bigger is
# cut off by the WebSocket layer (close 1009) before it is buffered.
WS_MAX_MESSAGE_BYTES: Final = 2 * (MAX_FRAME_JPEG_BYTES + FRAME_HEADER_BYTES + MAX_TEXT_MESSAGE_BYTES)

# Keyword arguments for uvicorn wherever it serves `/ws` (`python -m inference`, `python -m app`, the bench).
# Per-message deflate is uvicorn's default and every browser offers it, but the frames are JPEG, which
# deflate cannot shrink: it only spends CPU on both ends, all of it added to the latency the user sees
# (docs/performance.md, "The WebSocket on loopback").
WEBSOCKET_SERVER_OPTIONS: Final[Mapping[str, Any]] = MappingProxyType(
    {"ws_max_size": WS_MAX_MESSAGE_BYTES, "ws_per_message_deflate": False}
)


def worker_router(worker: Worker, *, path: str = "/") -> Router:
    @websocket("/ws")
    async def stream_socket(socket: WebSocket) -> None:
        await worker.handle(socket)

    return Router(path=path, route_handlers=[stream_socket])


def worker_ops_router(worker: Worker, *, path: str = "/") -> Router:
    @get("/health", sync_to_thread=False)
    def health() -> Response[dict[str, object]]:
        body: dict[str, object] = {
            "status": worker.status.value,
            "worker_id": worker.worker_id,
            "engine": worker.engine.name if worker.engine else worker.config.engine,
            "model": worker.engine.model if worker.engine else None,
            "sessions": len(worker.sessions),
        }
        replicas = worker.replica_report()
        if len(replicas) > 1:  # one per device; one that failed to load says why while the rest serve
            body["replicas"] = replicas
        if worker.failure:
            body["error"] = worker.failure
        # 503 until warm, so a load balancer only routes streams to a worker that can render them.
        return Response(body, status_code=200 if worker.status is WorkerStatus.READY else 503)

    @get("/metrics", sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(worker.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    return Router(path=path, route_handlers=[health, metrics])


def create_inference_app(
    config: WorkerConfig,
    *,
    engine_factory: Callable[[], Engine] | None = None,
    replicas: Sequence[tuple[str, Callable[[], Engine]]] | None = None,
    clock: Clock = time.time,
    http_client: httpx.AsyncClient | None = None,
) -> Litestar:
    """The standalone worker. The Worker is at `app.state.worker`; `engine_factory` and `replicas` as
    `Worker` takes them."""
    worker = Worker(
        config, engine_factory=engine_factory, replicas=replicas, clock=clock, http_client=http_client
    )
    return Litestar(
        route_handlers=[worker_router(worker), worker_ops_router(worker)],
        lifespan=[worker.lifespan],
        state=State({"worker": worker}),
    )
