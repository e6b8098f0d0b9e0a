"""The load generator speaks the protocol like the studio: at most two frames unacknowledged, frames at camera
rate, every session gets frames, and the figures it reports are the ones that crossed the socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.loadgen import main, run_arrivals, run_load
from inference.pacing import SETTLING_OUTPUTS
from tests.inference.helpers import SECRET, running_worker, worker_config


def test_load_generator_measures_a_real_worker_with_studio_flow_control() -> None:
    with running_worker(worker_config(preview_delay_seconds=0.05)) as running:
        result = asyncio.run(run_load(running.ws_url, SECRET, sessions=2, seconds=2.0, fps=30.0, steps=2))
        renders = running.metric("stylecast_worker_frames_out_total")
        frames_in = running.metric("stylecast_worker_frames_in_total")
    sessions = result["per_session"]
    assert len(sessions) == 2
    for session in sessions:
        assert session["engine"] == "preview"
        assert session["mode"] == "preview"
        assert session["modes"] == ["preview"]
        assert session["delivered"] > 3
        assert session["max_unacked"] <= 2
        assert session["sent"] - 2 <= session["acks"] <= session["sent"]
        assert not session["errors"]
        assert 50 <= session["latency_p50_ms"] < 1000  # at least the engine's 50 ms, and no backlog
        assert session["render_ms_p50"] >= 50
        assert session["latency_p95_ms"] >= session["latency_p50_ms"]
        # Paced (the worker renders one frame per call): its first outputs came one frame at a time, and
        # the settled figures are those of the rest.
        assert session["pacing"] is True
        assert session["settling_outputs"] == SETTLING_OUTPUTS, session
        assert session["settled_latency_p50_ms"] >= session["render_ms_p50"], session
    assert result["aggregate_fps"] <= 2 * 30
    assert sum(session["delivered"] for session in sessions) <= renders
    assert sum(session["sent"] for session in sessions) <= frames_in
    assert result["latency_p50_ms"] > 0
    assert result["mode"] == "preview"


def test_load_generator_sends_the_mode_it_is_given_and_refuses_one_the_engine_lacks() -> None:
    with running_worker() as running:
        result = asyncio.run(
            run_load(running.ws_url, SECRET, sessions=1, seconds=1.0, fps=30.0, steps=2, mode="preview")
        )
        assert result["per_session"][0]["mode"] == "preview"
        assert result["per_session"][0]["delivered"] > 0
        assert not result["per_session"][0]["errors"]
        with pytest.raises(ValueError, match="turbo"):
            asyncio.run(
                run_load(running.ws_url, SECRET, sessions=1, seconds=1.0, fps=30.0, steps=2, mode="turbo")
            )


def test_command_line_writes_its_results_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "load.json"
    monkeypatch.setenv("STREAM_SECRET", SECRET)
    with running_worker() as running:
        argv = [
            "--url",
            running.ws_url,
            "--sessions",
            "1",
            "--seconds",
            "1",
            "--fps",
            "15",
            "--mode",
            "preview",
        ]
        assert main([*argv, "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())
    assert run["sessions"] == 1
    assert run["target_fps"] == 15
    assert run["per_session"][0]["mode"] == "preview"
    assert "mode=preview" in capsys.readouterr().out


def test_arrivals_show_which_sessions_the_worker_admits() -> None:
    # At least 500 ms a frame: two sessions keep 0.68 FPS each, a third would not (as in test_admission).
    config = worker_config(preview_delay_seconds=0.5, min_session_fps=0.68)
    with running_worker(config) as running:
        result = asyncio.run(run_arrivals(running.ws_url, SECRET, arrivals=3, every=3.5, steps=2))
    windows = result["windows"]
    assert [window["admitted"] for window in windows] == [[True], [True, True], [True, True, False]]
    assert windows[2]["refused_code"] == 4503
    assert all(fps > 0 for fps in windows[1]["session_fps"])
