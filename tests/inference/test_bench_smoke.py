"""The benchmark end to end on the tiny configuration on CPU: every case runs and the record is written."""

from __future__ import annotations

import json

import pytest

from inference import bench


def test_bench_runs_every_case_and_writes_its_record(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--tiny", "--device", "cpu", "--steps", "2", "--batch", "2", "--iters", "1", "--warmup", "0"]
    record = bench.main([*args, "--phases", "eager", "--out", str(tmp_path)])

    (path,) = tmp_path.glob("*-tiny-cpu.json")
    assert record["path"] == str(path)
    saved = json.loads(path.read_text())
    assert saved["environment"]["random_weights"] is True
    rows = {(row["case"], row["steps"], row["batch"]): row for row in saved["rows"]}
    assert set(rows) == {
        ("baseline", 2, 1),
        ("render_frames", 2, 1),
        ("render", 2, 1),  # batch 1 is always measured
        ("render", 2, 2),
        ("transformer", None, 1),
        ("vae.encode", None, 1),
        ("vae.decode", None, 1),
        ("text_encoder", None, 1),
    }
    for row in rows.values():
        assert row["error"] is None
        assert row["median_ms"] > 0
        assert len(row["times_ms"]) == 1
    # The engine's exact mode reproduces the pipeline bit for bit, and the bench reports it.
    assert rows[("render_frames", 2, 1)]["max_abs"] == 0.0
    assert rows[("render", 2, 2)]["per_frame_ms"] == pytest.approx(rows[("render", 2, 2)]["median_ms"] / 2)

    table = capsys.readouterr().out.rsplit("wrote", 1)[1]
    assert "render_frames" in table
    assert "baseline" in table
