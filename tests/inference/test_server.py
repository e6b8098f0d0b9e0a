"""The worker's operational surface, and mounting it inside another app as the web app does."""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx
from litestar import Litestar, get

from inference.engines.base import Engine, FrameJob
from inference.protocol import CloseCode
from inference.server import Worker, worker_router
from tests.inference.helpers import (
    StreamClient,
    new_ticket,
    running_worker,
    wait_for,
    webcam_jpeg,
    worker_config,
)
from tests.live_server import serve


def test_health_and_metrics_describe_the_worker() -> None:
    with running_worker() as running, StreamClient.connect(running.ws_url) as client:
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 200
        assert health.json() == {
            "status": "ready",
            "worker_id": "test-worker",
            "engine": "preview",
            "model": "Preview filters (not AI)",
            "sessions": 0,
        }
        client.start(new_ticket())
        for frame_id in range(3):
            client.send_frame(frame_id, webcam_jpeg(160, 120))
            client.frame(frame_id)
        client.send_frame(9, b"not a jpeg")
        client.error()
        assert httpx.get(f"{running.url}/health").json()["sessions"] == 1

        metrics = httpx.get(f"{running.url}/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert "stylecast_worker_sessions 1.0" in text
        assert "stylecast_worker_frames_in_total 4.0" in text
        assert "stylecast_worker_frames_out_total 3.0" in text
        assert 'stylecast_worker_frame_errors_total{code="not_jpeg"} 1.0' in text
        assert "stylecast_worker_render_seconds_count 3.0" in text
        assert "stylecast_worker_engine_ready 1.0" in text


def test_two_workers_in_one_process_keep_separate_metrics() -> None:
    with running_worker() as first, running_worker() as second, StreamClient.connect(first.ws_url) as client:
        client.start(new_ticket())
        client.send_frame(1, webcam_jpeg(160, 120))
        client.frame(1)
        assert first.metric("stylecast_worker_frames_out_total") == 1
        assert second.metric("stylecast_worker_frames_out_total") == 0
        assert "stylecast_worker_frames_out_total 0.0" in httpx.get(f"{second.url}/metrics").text


def test_the_worker_mounts_inside_another_app() -> None:
    worker = Worker(worker_config())

    @get("/api/ping", sync_to_thread=False)
    def ping() -> str:
        return "pong"

    host = Litestar(route_handlers=[ping, worker_router(worker, path="/stream")], lifespan=[worker.lifespan])
    with serve(host) as url:
        wait_for(lambda: worker.engine is not None)
        assert httpx.get(f"{url}/api/ping").text == "pong"
        with StreamClient.connect(url.replace("http://", "ws://") + "/stream/ws") as client:
            client.start(new_ticket())
            client.send_frame(5, webcam_jpeg(160, 120))
            assert client.frame(5).frame_id == 5
    assert worker.status == "stopped"


class _BrokenEngine:
    name = "broken"
    model = "cannot load"
    max_batch = 1

    def warm_up(self) -> None:
        time.sleep(0.3)
        raise RuntimeError("CUDA out of memory")

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        raise AssertionError("never called")


def test_an_engine_that_fails_to_load_closes_streams_and_fails_health() -> None:
    def factory() -> Engine:
        return _BrokenEngine()

    with running_worker(engine_factory=factory, wait_ready=False) as running:
        with StreamClient.connect(running.ws_url) as waiting:
            waiting.send_hello(new_ticket())
            assert waiting.wait_closed(timeout=5) == CloseCode.INTERNAL_ERROR
            assert "CUDA out of memory" in (waiting.close_reason or "")
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        with StreamClient.connect(running.ws_url) as late:
            assert late.wait_closed(timeout=5) == CloseCode.INTERNAL_ERROR
