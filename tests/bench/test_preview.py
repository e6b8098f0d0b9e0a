"""The preview engine's bench times every style through the real engine and reports what it measured."""

from __future__ import annotations

import pytest

from bench import preview
from inference.engines.preview import STYLES


def test_every_style_is_timed_on_the_real_engine(capsys: pytest.CaptureFixture[str]) -> None:
    preview.main(["--frames", "2"])

    header, *rows, summary = capsys.readouterr().out.splitlines()
    assert header.split() == ["style", "wall", "fps", "cpu", "fps", "cpu", "ms", "p50", "cpu", "ms", "max"]
    timings = {row.split()[0]: [float(value) for value in row.split()[1:]] for row in rows}
    assert set(timings) == set(STYLES)
    for wall_fps, cpu_fps, cpu_ms_p50, cpu_ms_max in timings.values():
        assert wall_fps > 0
        assert cpu_fps > 0
        assert 0 < cpu_ms_p50 <= cpu_ms_max
    slowest = min(cpu_fps for _, cpu_fps, _, _ in timings.values())
    assert summary == f"slowest style: {slowest:.1f} fps of CPU time on one core"
