"""The bench's system measurements on the tiny flux2 configuration on CPU: concurrent sessions through the
real scheduler, the real worker on a loopback WebSocket, and a cold start in a child process."""

from __future__ import annotations

import json
import statistics

import pytest

from bench import system
from inference.engines.flux2 import Flux2Engine, create_flux2_engine


@pytest.fixture(scope="module")
def engine() -> Flux2Engine:
    engine = create_flux2_engine(tiny=True, compile=False, device="cpu", max_batch=2)
    engine.warm_up()
    return engine


def test_sessions_through_the_scheduler(engine: Flux2Engine) -> None:
    result = system.measure_sessions(engine, sessions=(1, 2), seconds=1.5, settle_seconds=0.3)

    json.dumps(result)
    assert result["error"] is None
    assert [run["sessions"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["error"] is None
        assert len(run["per_session"]) == run["sessions"]
        # Each session had its own prompt, and every one of them got frames.
        assert len({session["prompt"] for session in run["per_session"]}) == run["sessions"]
        for session in run["per_session"]:
            assert session["delivered"] > 0
            assert session["errors"] == 0
            assert session["latency_p50_ms"] > 0
            # A 30 fps camera outpaces the tiny model on CPU: most frames are replaced before rendering.
            assert session["submitted"] > session["delivered"]
        assert run["aggregate_fps"] == pytest.approx(sum(s["fps"] for s in run["per_session"]))
        assert 0.0 <= run["fairness"] <= 1.0
        assert sum(run["batches"].values()) > 0
        assert max(int(size) for size in run["batches"]) <= min(run["sessions"], engine.max_batch)
    assert result["runs"][0]["vs_single"] == pytest.approx(1.0)
    assert result["runs"][1]["meets_targets"]["aggregate"] is not None
    assert len(result["table"]) == 3


def test_websocket_on_loopback_with_its_levers(engine: Flux2Engine) -> None:
    engine.max_batch = 1  # as the bench's default --system-max-batch: the worker asks clients to pace
    try:
        result = system.measure_websocket(
            engine, sessions=(1,), seconds=2.0, engine_iters=2, engine_seconds=0.5, levers=True
        )
    finally:
        engine.max_batch = 2

    json.dumps(result)
    assert result["error"] is None
    assert result["engine_ms"]["1"]["median_ms"] > 0
    assert result["engine_fps"] == pytest.approx(1000 / result["engine_ms"]["1"]["median_ms"])
    # The engine's rate is the one it keeps up: calls for engine_seconds, at least engine_iters of them.
    timing = result["engine_ms"]["1"]
    assert timing["calls"] == len(timing["times_ms"]) >= 2
    assert sum(timing["times_ms"]) >= 0.9 * 500  # the calls themselves, without the loop between them
    assert timing["median_ms"] == pytest.approx(statistics.median(timing["times_ms"]))
    assert timing["first_median_ms"] == pytest.approx(statistics.median(timing["times_ms"][:2]))
    assert [(run["variant"], run["pacing"]) for run in result["runs"]] == [
        ("shipped", True),
        ("camera-rate", False),
        ("deflate", True),
    ]
    for run in result["runs"]:
        assert run["error"] is None
        assert run["aggregate_fps"] > 0
        assert run["per_session_fps"] == [run["aggregate_fps"]]
        assert run["latency_p50_ms"] > 0
        assert run["wait_ms_p50"] is not None
        assert run["latency_vs_engine_frame"] == pytest.approx(
            run["latency_p50_ms"] / result["engine_ms"]["1"]["median_ms"], rel=1e-3
        )
        assert run["fairness"] == pytest.approx(1.0)
    # Paced frames are sent one per render; at camera rate most are replaced before the engine takes them.
    shipped, camera_rate, _ = (run["loadgen"]["per_session"][0] for run in result["runs"])
    assert shipped["sent"] <= shipped["delivered"] + 3
    assert camera_rate["sent"] > shipped["sent"]
    assert len(result["table"]) == 4


def test_cold_start_in_a_child_process(engine: Flux2Engine, tmp_path) -> None:
    released = []
    reported: list[dict] = []
    result = system.measure_cold_start(
        engine,
        workdir=tmp_path,
        engine_options={"compile": False, "device": "cpu", "max_batch": 1},
        runs=("empty", "warm-restored"),
        release=lambda: released.append(True),
        on_run=reported.append,
    )

    json.dumps(result)
    assert released == [True]
    # The caller was given the record as it stood after each start: what it keeps if it is cut short.
    assert len(reported) == 2
    assert reported[-1] == result
    assert reported[0]["runs"] == result["runs"][:1]
    checkpoint = tmp_path / "checkpoint"
    assert result["checkpoint"] == str(checkpoint)
    assert (checkpoint / "model_index.json").is_file()
    for component in ("transformer", "vae", "text_encoder"):
        assert list((checkpoint / component).glob("*.safetensors")), component
    assert result["checkpoint_bytes"] > 0
    run, restored = result["runs"]
    assert run["error"] is None, run["stderr_tail"]
    assert run["cache"] == "empty"
    assert run["cache_files_before"] == 0
    assert run["first_frame_bytes"] > 0
    assert run["device"] == "cpu"
    assert run["marks"]["snapshot"] is None  # no snapshot in this start
    assert run["after_snapshot_s"] is None
    marks = [run["marks"][stage] for stage in system.COLD_START_STAGES if stage != "snapshot"]
    assert all(mark is not None for mark in marks)
    assert marks == sorted(marks)
    assert marks[0] >= 0
    assert run["total_s"] == pytest.approx(marks[-1], abs=1e-3)
    assert sum(filter(None, run["stages"].values())) == pytest.approx(run["total_s"], abs=0.01)
    assert run["wall_s"] >= run["total_s"]
    assert run["meets_target"] is None  # the target is for a warm compile cache
    assert len(result["table"]) == 3
    # The child wrote its bytecode beside the compile caches (whatever this process's environment says),
    # so a warm run imports compiled modules instead of compiling torch, diffusers and transformers anew.
    pycache = tmp_path / "compile-cache" / "pycache"
    assert run["bytecode_cache"] == str(pycache)
    assert any(pycache.rglob("diffusers/**/*.pyc"))
    assert list(run["imports"]) == ["torch", "transformers", "diffusers", "engine"]
    assert sum(run["imports"].values()) == pytest.approx(run["stages"]["imports"], abs=0.01)
    assert result["notes"][0].startswith("empty  imports: torch")
    # The text encoder loaded on its own thread beside the rest: started within load(), before the rest's
    # from_pretrained returned, and done by the first frame.
    text = run["text_encoder"]
    assert run["marks"]["device_init"] <= text["started"] <= run["marks"]["from_pretrained"]
    assert text["started"] <= text["loaded"] <= run["marks"]["first_frame"]
    assert "text encoder read" in result["notes"][0]
    # The collector was paused from the imports to the end of the warm-up, as in a worker: the collections
    # then are the one that ended the pause and any a library asked for (a running collector makes over a
    # thousand during these imports alone).
    assert run["start_up_collection"]["frozen"] > 0
    assert 1 <= run["collections"]["count"] < 50, run["collections"]
    assert run["collections"]["seconds"] >= run["start_up_collection"]["seconds"]
    assert "garbage collections" in result["notes"][0]
    # The checkpoint's weights were read ahead while the child imported its libraries, as a worker does.
    weights = list(checkpoint.glob("*/*.safetensors"))
    assert run["readahead"]["files"] == len(weights)
    assert (
        run["readahead"]["bytes_read"] == run["readahead"]["bytes"] == sum(p.stat().st_size for p in weights)
    )
    # The engine offered the production modes, and its warm-up's wall time was sampled: warm_up() was on
    # the main thread's stack through all of it, the default mode's warm-up under it.
    assert run["modes"] == ["exact", "fast", "turbo"]
    stacks = run["warm_up_stacks"]
    assert stacks["samples"] > 0
    # The stage also holds the collection that ends the collector's pause, after warm_up() returned.
    assert stacks["seconds"] == pytest.approx(
        run["stages"]["warm_up"] - run["start_up_collection"]["seconds"], abs=0.25
    )
    inclusive = dict(stacks["inclusive_s"])
    assert inclusive["inference/engines/flux2/engine.py:warm_up"] == pytest.approx(stacks["seconds"], rel=0.1)
    assert 0 < inclusive["inference/engines/flux2/engine.py:warm_up_mode"] <= stacks["seconds"]
    # A start from a CPU memory snapshot: first what the snapshot holds (the imports, the weights read into
    # host memory, nothing preloaded onto a device, the start-up pause ended with its collection), then the
    # local part of a restored container's start, timed from the snapshot.
    assert restored["error"] is None, restored["stderr_tail"]
    assert restored["cache"] == "warm-restored"
    marks = [restored["marks"][stage] for stage in system.COLD_START_STAGES if stage != "from_pretrained"]
    assert all(mark is not None for mark in marks), restored["marks"]
    assert marks == sorted(marks), restored["marks"]
    assert restored["marks"]["imports"] < restored["marks"]["snapshot"] < restored["marks"]["to_device"]
    assert restored["marks"]["from_pretrained"] is None  # the weights were read before the snapshot
    assert restored["after_snapshot_s"] == pytest.approx(
        restored["total_s"] - restored["marks"]["snapshot"],
        abs=2e-3,  # each of the three rounded to 1 ms
    )
    assert 0 < restored["after_snapshot_s"] < restored["total_s"]
    assert restored["preload"] is None
    assert restored["meets_target"] is None  # Modal's restore is not in it: no figure to judge
    assert restored["first_frame_bytes"] > 0
    assert "from the snapshot" in result["notes"][1]


def test_cold_start_refuses_options_that_would_not_load_the_checkpoint(engine: Flux2Engine, tmp_path) -> None:
    with pytest.raises(ValueError, match="tiny"):
        system.measure_cold_start(engine, workdir=tmp_path, engine_options={"tiny": True})
    assert not (tmp_path / "checkpoint").exists()
