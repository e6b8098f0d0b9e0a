"""modal_app.py imports offline without credentials, and its class serves frames through Modal's local
seam (`.local()` runs the `@modal.enter` hook, then returns the ASGI app) with the tiny flux2 engine."""

from __future__ import annotations

import warnings

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from inference.protocol import CloseCode, Ready
from tests.inference.helpers import SECRET, StreamClient, decode, new_ticket, wait_for, webcam_jpeg
from tests.live_server import serve


def test_modal_app_imports_offline_with_the_documented_shape() -> None:
    import modal_app

    assert modal_app.app.name == "stylecast-inference"
    requirements = modal_app.inference_requirements()
    assert any(requirement.startswith("diffusers") for requirement in requirements)
    assert any(requirement.startswith("litestar") for requirement in requirements)


def test_modal_class_serves_tiny_flux2_frames_through_the_local_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal_app

    monkeypatch.setenv("STREAM_SECRET", SECRET)
    monkeypatch.setenv("INFERENCE_ENGINE", "flux2")
    monkeypatch.setenv("FLUX2_WEIGHTS", "tiny")
    monkeypatch.delenv("USAGE_REPORT_URL", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "executing locally ... no mounted Volume"
        asgi_app = modal_app.Inference().web.local()

    with serve(asgi_app) as url:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=120)
        assert httpx.get(f"{url}/health").json()["engine"] == "flux2"
        with StreamClient.connect(url.replace("http://", "ws://") + "/ws") as client:
            client.send_hello(new_ticket())
            ready = client.receive_until(lambda message: isinstance(message, Ready), timeout=60)
            assert isinstance(ready, Ready)
            assert ready.engine == "flux2"
            assert ready.preview is False
            client.send_frame(7, webcam_jpeg(640, 480))
            frame = client.frame(7, timeout=60)
            pixels = decode(frame.jpeg)
            assert pixels.shape == (512, 512, 3)
            assert np.asarray(pixels).std() > 0  # an image, not a blank


def test_the_first_stream_after_a_cold_start_outlives_a_ticket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Modal hands a socket to the app only once `@modal.enter` has finished. A ticket fetched before the
    socket opened expires during a long warm-up; the connect sequence (wait for `admitted`, then fetch the
    ticket) streams at once."""
    import modal_app

    monkeypatch.setenv("STREAM_SECRET", SECRET)
    monkeypatch.setenv("INFERENCE_ENGINE", "preview")
    monkeypatch.setenv("PREVIEW_WARMUP_MS", "7000")  # longer than the ticket below lives, leeway included
    monkeypatch.delenv("USAGE_REPORT_URL", raising=False)
    fetched_before_connecting = new_ticket(ttl_seconds=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        asgi_app = modal_app.Inference().web.local()  # runs the enter hook: the 7 s warm-up

    with serve(asgi_app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        assert httpx.get(f"{url}/health").status_code == 200  # warm before the first socket arrives
        with StreamClient.connect(ws_url) as early:
            early.send_hello(fetched_before_connecting)
            with pytest.raises(ConnectionClosed):
                early.receive_until(lambda message: isinstance(message, Ready), timeout=5)
            assert early.close_code == CloseCode.BAD_TICKET
            assert "expired" in (early.close_reason or "")
        with StreamClient.connect(ws_url) as client:
            assert client.admitted is not None
            client.send_hello(new_ticket(ttl_seconds=1))  # fetched now, after the socket opened
            assert isinstance(client.receive_until(lambda m: isinstance(m, Ready), timeout=10), Ready)
            client.send_frame(1, webcam_jpeg(320, 240))
            assert client.frame(1).jpeg


def test_modal_concurrency_follows_the_admission_arithmetic() -> None:
    import modal_app

    # exact (13.8 FPS) carries one viewer at 12 FPS, turbo (30.5 FPS) two: Modal scales out at one viewer
    # per container and never routes more than the fastest mode carries plus the HTTP headroom.
    assert modal_app.SESSIONS_PER_GPU == {"exact": 1, "turbo": 2}
    assert modal_app.TARGET_INPUTS == 1
    assert modal_app.MAX_INPUTS == 4


@pytest.mark.parametrize("setting", ["1", "gpu"])
def test_the_snapshot_setting_serves_frames_after_both_enter_stages(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """MODAL_SNAPSHOT is read when the app is defined, so the module is imported anew with it; `.local()`
    runs the snapshotted enter hook, then the one after the restore, as a container does."""
    import importlib

    import modal_app

    monkeypatch.setenv("MODAL_SNAPSHOT", setting)
    monkeypatch.setenv("STREAM_SECRET", SECRET)
    monkeypatch.setenv("INFERENCE_ENGINE", "flux2")
    monkeypatch.setenv("FLUX2_WEIGHTS", "tiny")
    monkeypatch.setenv("FLUX2_DEVICE", "cpu")
    monkeypatch.delenv("USAGE_REPORT_URL", raising=False)
    snapshotting = importlib.reload(modal_app)
    try:
        assert snapshotting.MEMORY_SNAPSHOT
        assert snapshotting.GPU_SNAPSHOT is (setting == "gpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            asgi_app = snapshotting.Inference().web.local()
        with serve(asgi_app) as url:
            wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=120)
            with StreamClient.connect(url.replace("http://", "ws://") + "/ws") as client:
                client.send_hello(new_ticket())
                assert isinstance(client.receive_until(lambda m: isinstance(m, Ready), timeout=60), Ready)
                client.send_frame(3, webcam_jpeg(320, 240))
                assert decode(client.frame(3, timeout=60).jpeg).shape == (512, 512, 3)
    finally:
        monkeypatch.delenv("MODAL_SNAPSHOT")
        importlib.reload(modal_app)


def test_an_unknown_snapshot_setting_is_refused_when_the_app_is_defined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    import modal_app

    monkeypatch.setenv("MODAL_SNAPSHOT", "yes")
    try:
        with pytest.raises(ValueError, match="MODAL_SNAPSHOT must be 0, 1 or gpu"):
            importlib.reload(modal_app)
    finally:
        monkeypatch.delenv("MODAL_SNAPSHOT")
        importlib.reload(modal_app)
