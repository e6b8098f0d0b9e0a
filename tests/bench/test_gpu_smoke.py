"""The benchmark end to end on the tiny configuration on CPU: every case runs and the record is written."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import gpu


def test_bench_runs_every_case_and_writes_its_record(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--tiny", "--device", "cpu", "--steps", "2", "--batch", "2", "--iters", "1", "--warmup", "0"]
    # The compiled baseline's graph traced, not turned into CPU kernels: the engine's own compilation on a
    # CPU is the engine tests' (tests/inference/engines/flux2/).
    args += ["--baseline-compile-backend", "aot_eager"]
    sections = ["--sections", "baseline", "modes", "--modes", "exact", "turbo"]
    record = gpu.main([*args, *sections, "--out", str(tmp_path)])

    (path,) = tmp_path.glob("*-tiny-cpu.json")
    assert record["path"] == str(path)
    saved = json.loads(path.read_text())
    assert saved["environment"]["random_weights"] is True
    assert [(mode["id"], mode["approximate"]) for mode in saved["modes"]] == [
        ("exact", False),
        ("turbo", True),
    ]
    rows = {(row["phase"], row["case"], row["steps"], row["batch"]): row for row in saved["rows"]}
    assert set(rows) == {
        ("eager", "baseline", 2, 1),
        ("compiled", "baseline", 2, 1),
        ("eager", "render_frames", 2, 1),
        ("eager", "transformer", None, 1),
        ("eager", "vae.encode", None, 1),
        ("eager", "vae.decode", None, 1),
        ("eager", "text_encoder", None, 1),
        ("engine", "warm_up", 2, 1),  # the default mode, before the engine is ready
        ("engine", "warm_up_rest", 2, 1),  # batch column: how many modes were warmed up after it
        *(
            (f"mode:{mode}", case, 2, batch)
            for mode in ("exact", "turbo")
            for case, batch in (("render_frames", 1), ("render", 1), ("render", 2))
        ),
        # A new prompt each call: the pipeline's whole encoder, the engine's cut one launched and its own.
        *(("new prompt", case, None, 1) for case in ("pipeline", "launched", "prompt_embeds")),
        ("compiled", "transformer", None, 1),
        ("compiled", "vae.encode", None, 1),
        ("compiled", "vae.decode", None, 1),
    }
    assert saved["new_prompt_replayed_vs_launched_max_abs"] == 0.0
    for row in rows.values():
        assert row["error"] is None
        assert row["median_ms"] > 0
    # The exact mode reproduces the pipeline bit for bit (uncompiled, as on a CPU), and the bench says so;
    # the approximate mode is reported as different.
    assert rows[("eager", "render_frames", 2, 1)]["max_abs"] == 0.0
    assert rows[("mode:exact", "render_frames", 2, 1)]["max_abs"] == 0.0
    assert 0 < rows[("mode:turbo", "render_frames", 2, 1)]["max_abs"] < 0.1
    render = rows[("mode:turbo", "render", 2, 2)]
    assert render["per_frame_ms"] == pytest.approx(render["median_ms"] / 2)

    printed = capsys.readouterr().out.rsplit("wrote", 1)[1]
    assert "render_frames" in printed
    assert "2 steps: compiled pipeline baseline" in printed
    assert "x baseline" in printed


@pytest.mark.parametrize("flag", ["", "--levers", "--style-levers"])
def test_the_style_section_measures_its_levers_only_when_asked(tmp_path, flag: str) -> None:
    """Each lever mode is one more set of compiled shapes on a GPU, so a plain run leaves them out."""
    args = ["--tiny", "--device", "cpu", "--steps", "2", "--batch", "1", "--iters", "1", "--warmup", "0"]
    args += ["--sections", "style", "--modes", "turbo", "--no-components", "--out", str(tmp_path)]
    record = gpu.main([*args, *([flag] if flag else [])])
    cases = {(row["phase"], row["case"]) for row in record["rows"] if row["error"] is None}
    assert {("style:turbo", "render"), ("style:turbo", "render+style")} <= cases
    levers = {
        (f"style:turbo-{lever}", case)
        for lever in ("style256", "style-kv-per-frame")
        for case in ("render+style", "frames+style")
    }
    assert (levers <= cases) is bool(flag)
    assert bool(levers & cases) is bool(flag)
    # The modes section's levers come only with --levers.
    modes = {mode["id"] for mode in record["modes"]}
    assert ("lever-fp8" in modes) is (flag == "--levers")


def _bench_terminated_at(tmp_path: Path, options: list[str], at: Callable[[str], bool]) -> dict:
    """Run the bench on the tiny CPU model and send it SIGTERM (what `timeout` sends) at the first line of
    output that `at` accepts; the record it wrote on its way out."""
    command = [sys.executable, "-m", "bench.gpu", "--tiny", "--device", "cpu", "--steps", "2", "--batch", "1"]
    command += [*options, "--out", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if at(line.strip()):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    (path,) = tmp_path.glob("*-tiny-cpu.json")
    assert f"wrote what was measured to {path}" in output
    return json.loads(path.read_text())


def test_a_run_ended_by_its_time_limit_still_writes_what_it_measured(tmp_path) -> None:
    options = ["--iters", "1", "--warmup", "0", "--no-components", "--modes", "exact", "turbo"]
    options += ["--sections", "modes", "style"]
    # In the middle of the modes section.
    saved = _bench_terminated_at(
        tmp_path, options, lambda line: line.startswith("mode:exact") and " render " in line
    )
    assert saved["cut"] == "terminated in section modes"
    measured = {(row["phase"], row["case"]) for row in saved["rows"]}
    assert {("mode:exact", "render_frames"), ("mode:exact", "render")} <= measured
    assert not any(phase.startswith("style:") for phase, _ in measured)


def test_a_cold_start_cut_by_its_time_limit_keeps_the_starts_that_finished(tmp_path) -> None:
    options = ["--modes", "exact", "--sections", "cold-start", "--cold-start-runs", "empty", "warm"]
    options += ["--cold-start-dir", str(tmp_path / "cold")]
    # While the second start's child is running.
    saved = _bench_terminated_at(tmp_path, options, lambda line: line.startswith("cold start 1 (empty)"))
    assert saved["cut"] == "terminated in section cold-start"
    (run,) = saved["cold_start"]["runs"]
    assert run["cache"] == "empty"
    assert run["error"] is None
    assert run["total_s"] > 0
    assert len(saved["cold_start"]["table"]) == 2  # the header and the finished start


def _bench_spawning_a_cold_start(marker: Path, before_spawn: str = "") -> subprocess.Popen[bytes]:
    """A process that, like the bench, ends on SIGTERM and spawns one cold-start child naming ``marker``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, subprocess, sys\n"
            "from pathlib import Path\n"
            "from bench import system\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
            f"{before_spawn}"
            f"system._spawn_cold_start_child(Path({str(marker)!r}), {{}}, dict(os.environ), 120)\n",
        ]
    )


def test_a_bench_ended_while_a_cold_start_runs_ends_that_start_too(tmp_path) -> None:
    """The child runs in a session of its own (so that a timeout can end inductor's workers with it); when
    the bench is ended by SIGTERM, it must not go on holding the device."""
    marker = tmp_path / "checkpoint-of-this-test"
    runner = _bench_spawning_a_cold_start(marker)
    try:
        deadline = time.monotonic() + 60
        while not _cold_start_children(marker):
            assert runner.poll() is None, "the bench ended before its cold-start child started"
            assert time.monotonic() < deadline, "no cold-start child started"
            time.sleep(0.05)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 143
        assert not _cold_start_children(marker)
    finally:
        runner.kill()
        _end_cold_start_children(marker)


def test_a_bench_ended_as_its_cold_start_child_is_forked_still_ends_that_child(tmp_path) -> None:
    """The SIGTERM lands after the fork, before ``Popen`` has handed the child to the bench: on a loaded
    machine a likely moment to be ended in, and one with no pid yet to end the child by."""
    marker = tmp_path / "checkpoint-of-this-test"
    terminated_after_fork = (
        "spawn = subprocess.Popen.__init__\n"
        "def spawn_then_terminated(self, *args, **kwargs):\n"
        "    spawn(self, *args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "subprocess.Popen.__init__ = spawn_then_terminated\n"
    )
    runner = _bench_spawning_a_cold_start(marker, terminated_after_fork)
    try:
        assert runner.wait(timeout=60) == 143
        assert not _cold_start_children(marker)
    finally:
        runner.kill()
        _end_cold_start_children(marker)


def _cold_start_children(marker: Path) -> dict[int, str]:
    """Running cold-start children whose arguments name ``marker``: their command lines by pid."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = b" ".join(cmdline.read_bytes().split(b"\0"))
            if b"cold-start-child" in argv and str(marker).encode() in argv:
                found[int(cmdline.parent.name)] = argv.decode()
    return found


def _end_cold_start_children(marker: Path) -> None:
    """Ends what a failing test left running, so that it does not load the rest of the suite."""
    for pid in _cold_start_children(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
