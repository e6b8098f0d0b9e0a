"""modal_app.py imports offline without credentials, and its class serves frames through Modal's local
seam (`.local()` runs the `@modal.enter` hook, then returns the ASGI app) with the tiny flux2 engine."""

from __future__ import annotations

import warnings

import httpx
import numpy as np
import pytest

from inference.protocol import Ready
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
