"""Engine replicas through the worker's real `/ws`, driven like the studio drives it (bench.loadgen: the
ack flow control, paced as `ready.pace` asks): one viewer alone gets about the frame rate of every replica
together, four viewers share them fairly, a viewer's frames arrive in order even when renders finish out of
order, and the tiny flux2 engine on two CPU replicas renders what one replica renders.

Bounds are generous: the machine running these has two cores shared with other work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import httpx

from bench.loadgen import run_load
from inference.config import WorkerConfig
from inference.engines.base import Engine, FrameJob
from inference.engines.preview import PreviewEngine
from inference.protocol import Ack, CloseCode, Ready
from inference.server import WEBSOCKET_SERVER_OPTIONS, create_inference_app
from tests.inference.helpers import (
    SECRET,
    OutputFrame,
    RunningWorker,
    StreamClient,
    new_ticket,
    running_worker,
    wait_for,
    webcam_jpeg,
    worker_config,
)
from tests.live_server import serve

RENDER_SECONDS = 0.25  # the preview engine's delay per frame: ~3 FPS from one replica


def _load(replicas: int, sessions: int, seconds: float = 4.0) -> dict[str, object]:
    config = worker_config(preview_delay_seconds=RENDER_SECONDS, preview_replicas=replicas)
    with running_worker(config) as running:
        wait_for(lambda: running.worker.scheduler.ready_replicas == replicas)
        return asyncio.run(
            run_load(running.ws_url, SECRET, sessions=sessions, seconds=seconds, fps=30.0, steps=2)
        )


def test_one_viewer_alone_gets_the_frame_rate_of_both_replicas_at_one_renders_latency() -> None:
    one = _load(replicas=1, sessions=1)
    two = _load(replicas=2, sessions=1)
    solo_one, solo_two = one["per_session"][0], two["per_session"][0]  # type: ignore[index]
    assert solo_two["pacing"] is True  # the worker asked for paced frames, as with one replica
    assert 2 <= solo_one["steady_fps"] <= 4.2, solo_one
    # Twice the frames in the ideal; the replicas' CPU work shares two busy cores here.
    assert solo_two["steady_fps"] >= 1.4 * solo_one["steady_fps"], (solo_two, solo_one)
    # Each frame still takes one render: two replicas add frames, not latency.
    assert solo_two["latency_p50_ms"] <= 1.5 * solo_one["latency_p50_ms"], (solo_two, solo_one)
    assert solo_two["max_unacked"] <= 2  # within the protocol's flow control


def test_four_viewers_share_two_replicas_fairly_at_twice_one_replicas_rate() -> None:
    one = _load(replicas=1, sessions=4)
    two = _load(replicas=2, sessions=4)
    assert two["aggregate_fps"] >= 1.4 * one["aggregate_fps"], (two["aggregate_fps"], one["aggregate_fps"])  # type: ignore[operator]
    assert two["min_session_share"] >= 0.75, two["per_session"]  # type: ignore[operator]
    assert all(session["delivered"] > 3 for session in two["per_session"])  # type: ignore[union-attr]


class UnevenEngine:
    """The preview engine, but odd frames take much longer than even ones, so on two replicas a newer
    frame often finishes first."""

    name = "uneven"
    model = "uneven render times"
    max_batch = 1
    modes = PreviewEngine.modes

    def __init__(self) -> None:
        self._preview = PreviewEngine(max_batch=1)

    def warm_up(self) -> None:
        self._preview.warm_up()

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        time.sleep(0.25 if jobs[0].frame_id % 2 else 0.03)
        return self._preview.render(jobs)


@contextmanager
def _serving(
    config: WorkerConfig, replicas: list[tuple[str, Callable[[], Engine]]]
) -> Iterator[RunningWorker]:
    app = create_inference_app(config, replicas=replicas)
    with serve(app, **WEBSOCKET_SERVER_OPTIONS) as url:
        running = RunningWorker(
            url=url, ws_url=url.replace("http://", "ws://") + "/ws", app=app, worker=app.state.worker
        )
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=20)
        yield running


def _stream(client: StreamClient, frames: int, gap: float) -> list[int]:
    """Send `frames` frames `gap` seconds apart (fewer than two unacknowledged), then collect the output
    ids until the last one arrives."""
    jpeg = webcam_jpeg()
    outputs: list[int] = []
    unacked: set[int] = set()
    for frame_id in range(1, frames + 1):
        deadline = time.monotonic() + 5
        while len(unacked) >= 2 and time.monotonic() < deadline:
            message = client.receive(timeout=5)
            _settle(message, unacked, outputs)
        client.send_frame(frame_id, jpeg)
        unacked.add(frame_id)
        time.sleep(gap)
    while not outputs or outputs[-1] != frames:
        _settle(client.receive(timeout=10), unacked, outputs)
    return outputs


def _settle(message: object, unacked: set[int], outputs: list[int]) -> None:
    if isinstance(message, Ack):
        unacked.discard(message.frame)
    elif isinstance(message, OutputFrame):
        outputs.append(message.frame_id)
        unacked.difference_update({frame for frame in unacked if frame <= message.frame_id})


def test_a_viewer_never_sees_an_older_frame_after_a_newer_one_when_renders_finish_out_of_order() -> None:
    config = worker_config()
    with _serving(config, [("a", UnevenEngine), ("b", UnevenEngine)]) as running:
        with StreamClient.connect(running.ws_url) as client:
            client.start(new_ticket())
            outputs = _stream(client, frames=24, gap=0.06)
        late = running.metric("stylecast_worker_frames_dropped_total", stage="late")
        health = httpx.get(f"{running.url}/health").json()
    assert outputs == sorted(set(outputs)), outputs
    assert late >= 1, "no render finished out of order: the test did not test anything"
    assert len(outputs) + late <= 24
    assert [replica["state"] for replica in health["replicas"]] == ["ready", "ready"]
    assert all(replica["frames"] > 0 for replica in health["replicas"])


def _tiny_flux2_outputs(devices: str, frames: Sequence[bytes]) -> tuple[list[bytes], dict[str, object]]:
    config = worker_config(engine="flux2", weights="tiny", devices=devices, min_session_fps=0.01)
    with running_worker(config, wait_ready=False) as running:
        replicas = len(config.device_list)
        wait_for(lambda: running.worker.scheduler.ready_replicas == replicas, timeout=240, interval=0.2)
        with StreamClient.connect(running.ws_url) as client:
            ready = client.start(new_ticket(), timeout=120)
            assert isinstance(ready, Ready)
            assert ready.engine == "flux2"
            client.send_json('{"type": "params", "prompt": "a clay figure", "seed": 3}')
            outputs = []
            for frame_id, jpeg in enumerate(frames, start=1):
                client.send_frame(frame_id, jpeg)  # one at a time: each output is that frame's
                outputs.append(client.frame(frame_id, timeout=120).jpeg)
        health = httpx.get(f"{running.url}/health").json()
    return outputs, health


def test_tiny_flux2_on_two_cpu_replicas_renders_what_one_replica_renders() -> None:
    frames = [webcam_jpeg(shift=shift) for shift in (0, 12, 24, 36)]
    single, single_health = _tiny_flux2_outputs("cpu", frames)
    double, health = _tiny_flux2_outputs("cpu,cpu", frames)
    assert "replicas" not in single_health  # one replica: /health as before
    assert [replica["replica"] for replica in health["replicas"]] == ["cpu", "cpu"]  # type: ignore[index]
    # Both replicas rendered (frames alternate between them), and every frame is the same picture.
    assert all(replica["frames"] >= 1 for replica in health["replicas"])  # type: ignore[index]
    assert double == single
    assert len(set(single)) == len(single)  # four different pictures, not one frame four times


def _stream_until_measured(client: StreamClient, frames: int = 4) -> None:
    jpeg = webcam_jpeg(160, 120)
    for frame_id in range(1, frames + 1):
        client.send_frame(frame_id, jpeg)
        client.frame(frame_id, timeout=10)


def test_admission_takes_the_viewers_that_every_replica_together_carries() -> None:
    # 200 ms or more a frame: one replica gives two viewers 2.5 FPS or less, under the floor of 3.4; two
    # replicas give them 1 / cost each, over the floor while a frame costs under 294 ms, and three 3.33 or
    # less.
    for replicas, admitted in ((1, 1), (2, 2)):
        config = worker_config(preview_delay_seconds=0.2, preview_replicas=replicas, min_session_fps=3.4)
        with running_worker(config) as running:
            wait_for(lambda: running.worker.scheduler.ready_replicas == replicas)  # noqa: B023
            with StreamClient.connect(running.ws_url) as first:
                first.start(new_ticket())
                _stream_until_measured(first)
                with StreamClient.connect(running.ws_url) as second:
                    if admitted == 1:
                        assert second.close_code == CloseCode.WORKER_FULL
                        continue
                    assert second.admitted is not None
                    second.start(new_ticket())
                    with StreamClient.connect(running.ws_url) as third:
                        assert third.close_code == CloseCode.WORKER_FULL


class BrokenDevice:
    def __call__(self) -> Engine:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def test_a_replica_that_fails_to_load_shows_in_health_and_metrics_while_the_rest_serve() -> None:
    replicas: list[tuple[str, Callable[[], Engine]]] = [("cuda:0", PreviewEngine), ("cuda:1", BrokenDevice())]
    with _serving(worker_config(), replicas) as running:
        wait_for(lambda: running.metric("stylecast_worker_replicas", state="failed") == 1)
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ready"
        assert body["replicas"][0] == {"replica": "cuda:0", "state": "ready", "frames": 0}
        assert body["replicas"][1]["state"] == "failed"
        assert "no kernel image" in body["replicas"][1]["error"]
        assert running.metric("stylecast_worker_replicas", state="ready") == 1
        with StreamClient.connect(running.ws_url) as client:
            client.start(new_ticket())
            client.send_frame(1, webcam_jpeg())
            assert client.frame(1).jpeg[:2] == b"\xff\xd8"
        # Admission counts the replica that serves, not the one configured.
        assert running.worker.admission.replicas == 1


def test_a_worker_whose_every_replica_fails_to_load_is_failed() -> None:
    replicas: list[tuple[str, Callable[[], Engine]]] = [
        ("cuda:0", BrokenDevice()),
        ("cuda:1", BrokenDevice()),
    ]
    app = create_inference_app(worker_config(), replicas=replicas)
    with serve(app, **WEBSOCKET_SERVER_OPTIONS) as url:
        wait_for(lambda: httpx.get(f"{url}/health").json()["status"] == "failed")
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503
        assert "no kernel image" in health.json()["error"]
        assert [replica["state"] for replica in health.json()["replicas"]] == ["failed", "failed"]
        with StreamClient.connect(url.replace("http://", "ws://") + "/ws") as client:
            assert client.close_code == 1011
