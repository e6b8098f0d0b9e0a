"""modal_app.py's premium class (two GPUs in one container, one engine replica each) serves through
Modal's local seam (`.local()` runs the `@modal.enter` hooks, then returns the ASGI app) with the tiny flux2
engine on two CPU replicas standing in for the two GPUs, and its floor keeps a container to one exact
viewer."""

from __future__ import annotations

import warnings

import httpx
import pytest

from inference.protocol import Ready
from tests.inference.helpers import SECRET, StreamClient, decode, new_ticket, wait_for, webcam_jpeg
from tests.live_server import serve


def test_the_premium_class_serves_one_viewer_from_two_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal_app

    monkeypatch.setenv("STREAM_SECRET", SECRET)
    monkeypatch.setenv("INFERENCE_ENGINE", "flux2")
    monkeypatch.setenv("FLUX2_WEIGHTS", "tiny")
    monkeypatch.setenv("FLUX2_DEVICES", "cpu,cpu")  # the container's two GPUs, on a machine without any
    monkeypatch.delenv("USAGE_REPORT_URL", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "executing locally ... no mounted Volume"
        asgi_app = modal_app.InferencePremium().web.local()

    with serve(asgi_app) as url:
        # Ready with the first warm replica; the second joins once warm (the engines warm one at a time).
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=120)
        wait_for(
            lambda: all(r["state"] == "ready" for r in httpx.get(f"{url}/health").json()["replicas"]),
            timeout=120,
            interval=0.2,
        )
        health = httpx.get(f"{url}/health").json()
        assert [(r["replica"], r["state"]) for r in health["replicas"]] == [
            ("cpu", "ready"),
            ("cpu", "ready"),
        ]
        with StreamClient.connect(url.replace("http://", "ws://") + "/ws") as client:
            client.send_hello(new_ticket())
            assert isinstance(client.receive_until(lambda m: isinstance(m, Ready), timeout=60), Ready)
            for frame_id in (1, 2, 3):
                client.send_frame(frame_id, webcam_jpeg(320, 240, shift=frame_id))
                assert decode(client.frame(frame_id, timeout=60).jpeg).shape == (512, 512, 3)
        frames = [r["frames"] for r in httpx.get(f"{url}/health").json()["replicas"]]
        assert sum(frames) >= 3
        assert all(count >= 1 for count in frames), frames  # the viewer's frames went to both


def test_the_premium_floor_keeps_a_container_to_the_viewers_two_gpus_carry() -> None:
    import modal_app

    # Two GPUs' exact frames (2 x 13.8 FPS) carry one viewer at the premium floor of 24 FPS, turbo two:
    # Modal starts a new container at the second exact viewer.
    assert modal_app.PREMIUM_SESSIONS == {"exact": 1, "turbo": 2}
    assert modal_app.PREMIUM_TARGET_INPUTS == 1
    assert modal_app.PREMIUM_MAX_INPUTS == 4
    # One GPU at that floor could not even give one exact viewer 24 FPS.
    assert modal_app.sessions_per_container(1, modal_app.PREMIUM_MIN_SESSION_FPS)["exact"] == 1
    assert 1 * modal_app.ENGINE_FPS["exact"] < modal_app.PREMIUM_MIN_SESSION_FPS
    assert modal_app.PREMIUM_GPUS * modal_app.ENGINE_FPS["exact"] >= modal_app.PREMIUM_MIN_SESSION_FPS
