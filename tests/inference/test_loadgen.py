"""The load generator speaks the protocol like the studio: two frames in flight at most, every session
gets frames, and the figures it reports are the ones that crossed the socket."""

from __future__ import annotations

import asyncio

from inference.loadgen import run_load
from tests.inference.helpers import SECRET, running_worker, worker_config


def test_load_generator_measures_a_real_worker_with_studio_flow_control() -> None:
    with running_worker(worker_config(preview_delay_seconds=0.05)) as running:
        result = asyncio.run(run_load(running.ws_url, SECRET, sessions=2, seconds=2.0, fps=30.0, steps=2))
        renders = running.metric("stylecast_worker_frames_out_total")
    sessions = result["per_session"]
    assert len(sessions) == 2
    for session in sessions:
        assert session["engine"] == "preview"
        assert session["delivered"] > 3
        assert session["max_unanswered"] <= 2
        assert 50 <= session["latency_p50_ms"] < 1000  # at least the engine's 50 ms, and no backlog
    assert result["aggregate_fps"] <= 2 * 30
    assert sum(session["delivered"] for session in sessions) <= renders
