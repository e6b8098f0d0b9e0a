"""bench.replicas on a CPU: the preview engine with 1 and 2 replicas, 1 and 2 sessions, through the worker's
real /ws; the record has every case, the summary compares 2 replicas with 1, and the JSON is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.replicas import main


def test_the_replicas_bench_measures_one_and_two_preview_replicas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = main(
        ["--seconds", "2", "--preview-delay", "0.2", "--sessions", "1", "2", "--out", str(tmp_path)]
    )
    runs = record["runs"]
    assert [(run["replicas"], run["sessions"]) for run in runs] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(run["error"] is None for run in runs), runs
    for run in runs:
        assert run["aggregate_fps"] > 0
        assert len(run["per_session_fps"]) == run["sessions"]
        assert run["latency_p95_ms"] >= run["latency_p50_ms"] >= 200  # at least the 200 ms render
        assert 0 < run["fairness"] <= 1
        assert run["pacing"] is True
        assert len(run["frames_per_replica"]) == run["replicas"]
    # One viewer alone on two replicas has frames rendered on both, and more of them than on one.
    solo_two = runs[2]
    assert all(frames > 0 for frames in solo_two["frames_per_replica"])
    assert solo_two["aggregate_fps"] > runs[0]["aggregate_fps"]
    summary = record["summary"]
    assert summary["replicas"] == 2
    assert summary["solo_speedup"] == pytest.approx(solo_two["aggregate_fps"] / runs[0]["aggregate_fps"])
    assert summary["shared_sessions"] == 2
    assert isinstance(summary["shared_speedup_met"], bool)
    written = json.loads(Path(record["path"]).read_text())
    assert written["runs"][2]["frames_per_replica"] == solo_two["frames_per_replica"]
    printed = capsys.readouterr().out
    assert "1 session, 2 replicas vs 1:" in printed
    assert "2 sessions, 2 replicas vs 1:" in printed
