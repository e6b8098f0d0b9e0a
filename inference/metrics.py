"""Prometheus metrics of one worker, in a registry of its own: several workers (or a worker inside the web
app) can live in one process without their metric names colliding in the global registry."""

from __future__ import annotations

import sys

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("stylecast_worker_sessions", "Authenticated WebSocket sessions", registry=r)
        self.sessions_refused = Counter(
            "stylecast_worker_sessions_refused",
            "Connections refused as full (4503): another session would drop below MIN_SESSION_FPS",
            registry=r,
        )
        self.sessions_idle = Counter(
            "stylecast_worker_sessions_idle", "Sessions closed for sending no frame (4410)", registry=r
        )
        self.engine_ready = Gauge("stylecast_worker_engine_ready", "1 once the engine is warm", registry=r)
        self.replicas = Gauge(
            "stylecast_worker_replicas",
            "Engine replicas (one per device) by state: loading, ready, failed",
            ["state"],
            registry=r,
        )
        self.frames_in = Counter("stylecast_worker_frames_in", "Binary frames received", registry=r)
        self.frames_out = Counter("stylecast_worker_frames_out", "Styled frames delivered", registry=r)
        self.frames_dropped = Counter(
            "stylecast_worker_frames_dropped",
            "Frames replaced by a newer one: input before rendering, output before sending, late (a newer "
            "frame of the session finished first on another replica)",
            ["stage"],
            registry=r,
        )
        self.frame_errors = Counter(
            "stylecast_worker_frame_errors", "Error messages sent, by code", ["code"], registry=r
        )
        self.render_seconds = Histogram(
            "stylecast_worker_render_seconds",
            "Wall time of one engine render call (one batch)",
            buckets=(0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "stylecast_worker_batch_size",
            "Frames per render call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.billable_seconds = Counter(
            "stylecast_worker_billable_seconds", "Billable stream seconds across all sessions", registry=r
        )
        self.gpu_memory_allocated = Gauge(
            "stylecast_worker_gpu_memory_allocated_bytes", "CUDA memory held by tensors", registry=r
        )
        self.gpu_memory_reserved = Gauge(
            "stylecast_worker_gpu_memory_reserved_bytes",
            "CUDA memory held by the caching allocator",
            registry=r,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.render_seconds.observe(seconds)

    def exposition(self) -> bytes:
        self._sample_gpu_memory()
        return generate_latest(self.registry)

    def _sample_gpu_memory(self) -> None:
        # Only when an engine already imported torch: the preview worker must not pay for importing it.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        self.gpu_memory_allocated.set(torch.cuda.memory_allocated())
        self.gpu_memory_reserved.set(torch.cuda.memory_reserved())
