"""The device-idle timeline of a profiled pass: busy time with overlaps merged, the gaps that make up the
idle time (histogram, largest, per boundary pair), the host time around the device work, and torch's
profiler events read into it (on CPU: host ranges only, and the summary says there was no device work)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from bench.timeline import (
    NO_DEVICE_ACTIVITY,
    Interval,
    format_timeline,
    intervals_from_events,
    summarize,
    write_pass_timeline,
)


def kernel(name: str, start: float, end: float) -> Interval:
    return Interval(name, start, end, "kernel")


def histogram(summary: dict) -> dict[str, tuple[int, float]]:
    return {row["bucket"]: (row["count"], row["total_us"]) for row in summary["gap_histogram"]}


def test_overlapping_and_touching_activities_are_one_busy_stretch_and_the_gaps_are_the_idle_time() -> None:
    summary = summarize(
        [
            Interval("render_frames", 0, 200, "host"),
            kernel("a", 10, 20),
            kernel("b", 15, 30),  # overlaps a
            kernel("c", 30, 35),  # touches b: no gap
            Interval("Memcpy HtoD", 40, 60, "memcpy"),  # 5 µs after c
            kernel("d", 42, 50),  # inside the copy: the copy still closes the stretch
            Interval("Memset", 61.5, 62, "memset"),  # 1.5 µs after the copy
            kernel("e", 162, 170),  # 100 µs after the memset
        ]
    )

    # Window 10..170; busy 25 + 20 + 0.5 + 8 = 53.5 µs; idle 5 + 1.5 + 100.
    assert summary["window_ms"] == 0.16
    assert summary["busy_ms"] == 0.0535
    assert summary["idle_ms"] == 0.1065
    assert summary["idle_fraction"] == pytest.approx(106.5 / 160, abs=1e-4)
    assert summary["gaps"] == 3
    assert summary["host_before_device_ms"] == 0.01
    assert summary["host_after_device_ms"] == 0.03
    assert summary["pass_ms"] == 0.2
    assert summary["by_kind"] == {
        "kernel": {"count": 5, "total_ms": 0.046},
        "memcpy": {"count": 1, "total_ms": 0.02},
        "memset": {"count": 1, "total_ms": 0.0005},
    }
    assert [(g["gap_us"], g["offset_us"], g["before"], g["after"]) for g in summary["largest_gaps"]] == [
        (100.0, 52.0, "Memset", "e"),
        (5.0, 25.0, "c", "Memcpy HtoD"),
        (1.5, 50.0, "Memcpy HtoD", "Memset"),
    ]
    assert sum(total for _, total in histogram(summary).values()) == pytest.approx(106.5)


def test_gaps_fall_into_buckets_by_their_inclusive_upper_bounds() -> None:
    starts = [0.0]
    for gap in (2.0, 10.0, 100.0, 1000.0, 1000.5, 0.25):
        starts.append(starts[-1] + 1 + gap)
    summary = summarize([kernel(f"k{i}", start, start + 1) for i, start in enumerate(starts)])

    assert histogram(summary) == {
        "<=2us": (2, 2.25),
        "2-10us": (1, 10.0),
        "10-100us": (1, 100.0),
        "100us-1ms": (1, 1000.0),
        ">1ms": (1, 1000.5),
    }
    assert summary["idle_ms"] == pytest.approx(2.11275, abs=1e-3)


def test_a_boundary_repeated_once_per_block_and_step_adds_up_in_its_pair() -> None:
    intervals = []
    t = 0.0
    for block in range(50):  # 25 blocks x 2 steps
        if block:
            t += 0.5  # attn -> gemm of the next block
        intervals.append(kernel("gemm", t, t + 10))
        t += 10 + 3  # gemm -> attn
        intervals.append(kernel("attn", t, t + 5))
        t += 5
    intervals.append(kernel("vae", t + 1500, t + 1510))
    t += 1510
    intervals.append(Interval("Memcpy DtoH", t + 200, t + 201, "memcpy"))

    summary = summarize(intervals)

    pairs = [(p["before"], p["after"], p["count"], p["total_us"], p["mean_us"]) for p in summary["gap_pairs"]]
    assert pairs == [
        ("attn", "vae", 1, 1500.0, 1500.0),
        ("vae", "Memcpy DtoH", 1, 200.0, 200.0),
        ("gemm", "attn", 50, 150.0, 3.0),
        ("attn", "gemm", 49, 24.5, 0.5),
    ]
    assert histogram(summary)["<=2us"] == (49, 24.5)
    assert histogram(summary)["2-10us"] == (50, 150.0)
    assert summary["idle_ms"] == 1.8745
    # Each block's kernels run 15 µs: 50 blocks, the VAE kernel and the copy.
    assert summary["busy_ms"] == pytest.approx((50 * 15 + 10 + 1) / 1000)


def test_only_the_largest_gaps_and_pairs_are_kept_and_long_names_are_cut() -> None:
    long_name = "void cutlass::Kernel<" + "x" * 200 + ">"
    intervals = [kernel(long_name, 0, 1)]
    t = 1.0
    for i in range(1, 21):  # 20 gaps of 1..20 µs, each between a different pair
        intervals.append(kernel(f"k{i:02d}", t + i, t + i + 1))
        t += i + 1

    summary = summarize(intervals)

    assert summary["gaps"] == 20
    assert [gap["gap_us"] for gap in summary["largest_gaps"]] == [float(g) for g in range(20, 5, -1)]
    assert [pair["total_us"] for pair in summary["gap_pairs"]] == [float(g) for g in range(20, 10, -1)]
    first = summary["largest_gaps"][-1]  # the 6 µs gap
    assert (first["before"], first["after"]) == ("k05", "k06")
    # The 1 µs gap after the long-named kernel is not among the largest; every name kept is cut to 80.
    everything = summarize(intervals[:2])
    before = everything["largest_gaps"][0]["before"]
    assert len(before) == 80
    assert before.startswith("void cutlass::Kernel<x")
    assert before.endswith("...")


def test_a_pass_without_device_work_says_so() -> None:
    summary = summarize([Interval("aten::mm", 0, 40, "host"), Interval("aten::relu", 45, 50, "host")])

    assert summary == {"host_events": 2, "device_activities": 0, "pass_ms": 0.05, "note": NO_DEVICE_ACTIVITY}
    assert "no device activity" in format_timeline(summary, "exact")[0]
    assert summarize([])["note"] == NO_DEVICE_ACTIVITY


def test_intervals_it_cannot_place_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown interval kind 'gpu'"):
        summarize([Interval("x", 0, 1, "gpu")])
    with pytest.raises(ValueError, match="ends"):
        summarize([kernel("x", 5, 4)])


def device_event(
    name: str, start: float, end: float, activity_type: str | None, is_user_annotation: bool = False
) -> FunctionEvent:
    return FunctionEvent(
        id=0,
        name=name,
        thread=7,
        start_us=start,
        end_us=end,
        device_type=DeviceType.CUDA,
        activity_type=activity_type,
        is_user_annotation=is_user_annotation,
    )


def test_device_annotations_and_sync_records_do_not_count_as_busy() -> None:
    """A record_function range is also reported on the device's stream, spanning the kernels and the gaps
    between them; only kernels, copies and fills occupy the device."""
    events = [
        FunctionEvent(
            id=1, name="cudaGraphLaunch", thread=1, start_us=0, end_us=4, activity_type="cuda_runtime"
        ),
        FunctionEvent(
            id=2, name="Activity Buffer Request", thread=1, start_us=0, end_us=900, activity_type="overhead"
        ),
        device_event("render_frames", 10, 100, "gpu_user_annotation"),
        device_event("nvjet_gemm", 10, 40, "kernel"),
        device_event("Memcpy DtoD (Device -> Device)", 50, 60, "gpu_memcpy"),
        device_event("Memset (Device)", 60, 70, "gpu_memset"),
        device_event("cudaStreamWaitEvent", 70, 80, "cuda_sync"),
        device_event("flash_fwd", 90, 100, None),  # a torch that reports no activity type
        device_event("Memcpy HtoD (Pinned -> Device)", 100, 101, None),
        FunctionEvent(id=3, name="cudaDeviceSynchronize", thread=1, start_us=5, end_us=120),
    ]

    intervals = intervals_from_events(events)

    assert [(i.name, i.kind) for i in intervals] == [
        ("cudaGraphLaunch", "host"),
        ("nvjet_gemm", "kernel"),
        ("Memcpy DtoD (Device -> Device)", "memcpy"),
        ("Memset (Device)", "memset"),
        ("flash_fwd", "kernel"),
        ("Memcpy HtoD (Pinned -> Device)", "memcpy"),
        ("cudaDeviceSynchronize", "host"),
    ]
    summary = summarize(intervals)
    assert summary["window_ms"] == 0.091
    assert summary["busy_ms"] == 0.061  # 30 + 20 + 11: the annotation would have made it 91
    assert summary["host_before_device_ms"] == 0.01
    assert summary["host_after_device_ms"] == 0.019
    assert [(p["before"], p["after"], p["total_us"]) for p in summary["gap_pairs"]] == [
        ("Memset (Device)", "flash_fwd", 20.0),
        ("nvjet_gemm", "Memcpy DtoD (Device -> Device)", 10.0),
    ]


def test_events_without_activity_types_are_placed_by_name_and_annotation_flag() -> None:
    """torch 2.11 (the H200 machines') gives its events no activity type: a compiled region's range on the
    device stream is told apart by its annotation flag, the profiler's buffer request on the host by name."""
    events = [
        FunctionEvent(id=1, name="Activity Buffer Request", thread=1, start_us=0, end_us=500),
        FunctionEvent(id=2, name="Torch-Compiled Region: 0/0", thread=1, start_us=100, end_us=130),
        device_event("Torch-Compiled Region: 0/0", 110, 200, None, is_user_annotation=True),
        device_event("sm80_xmma_gemm_f32f32", 110, 150, None),
        device_event("triton_poi_fused_add_mul_relu_0", 180, 200, None),
        device_event("Memset (Device)", 200, 204, None),
        FunctionEvent(id=3, name="cudaDeviceSynchronize", thread=1, start_us=120, end_us=210),
    ]

    intervals = intervals_from_events(events)

    assert [(i.name, i.kind) for i in intervals] == [
        ("Torch-Compiled Region: 0/0", "host"),
        ("sm80_xmma_gemm_f32f32", "kernel"),
        ("triton_poi_fused_add_mul_relu_0", "kernel"),
        ("Memset (Device)", "memset"),
        ("cudaDeviceSynchronize", "host"),
    ]
    summary = summarize(intervals)
    assert (summary["window_ms"], summary["busy_ms"], summary["idle_ms"]) == (0.094, 0.064, 0.03)
    assert (summary["host_before_device_ms"], summary["host_after_device_ms"]) == (0.01, 0.006)
    assert summary["pass_ms"] == 0.11


def test_the_real_profiler_on_cpu_gives_host_ranges_and_no_device_part(tmp_path: Path) -> None:
    with profile(activities=[ProfilerActivity.CPU]) as profiler, record_function("pass"):
        x = torch.randn(64, 64)
        for _ in range(3):
            x = torch.relu(x @ x)

    intervals = intervals_from_events(profiler.events())
    names = {interval.name for interval in intervals}
    assert {"pass", "aten::mm", "aten::relu"} <= names
    assert {interval.kind for interval in intervals} == {"host"}

    summary = write_pass_timeline(profiler, tmp_path / "out", "exact")

    assert summary["device_activities"] == 0
    assert summary["note"] == NO_DEVICE_ACTIVITY
    assert summary["host_events"] == len(intervals)
    outer = next(i for i in intervals if i.name == "pass")
    # pass_ms is rounded to 0.1 µs: at least the outermost range, up to that rounding.
    assert summary["pass_ms"] >= (outer.end_us - outer.start_us) / 1000 - 1e-4
    assert outer.end_us > outer.start_us
    assert json.loads((tmp_path / "out" / "timeline-exact.json").read_text()) == summary
    with gzip.open(tmp_path / "out" / "trace-exact.json.gz", "rt") as trace:
        events = json.load(trace)["traceEvents"]
    assert {"pass", "aten::mm"} <= {event.get("name") for event in events}
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "timeline-exact.json",
        "trace-exact.json.gz",
    ]


def test_the_console_lines_name_the_idle_time_and_the_costliest_boundaries() -> None:
    summary = summarize(
        [
            Interval("render_frames", 0, 100, "host"),
            kernel("gemm", 10, 20),
            kernel("attn", 23, 30),
            kernel("gemm", 30.5, 40),
            kernel("norm", 60, 70),
        ]
    )

    lines = format_timeline(summary, "one 2-step exact render")

    assert lines[0] == (
        "  timeline of one 2-step exact render: device window 0.06 ms, busy 0.0365 ms,"
        " idle 0.0235 ms (39.2%) in 3 gaps"
    )
    assert (
        lines[1] == "    host before the first device activity 0.01 ms, after the last 0.03 ms (pass 0.1 ms)"
    )
    assert lines[2:] == [
        "    20.0 us in 1 gaps: gemm -> norm",
        "    3.0 us in 1 gaps: gemm -> attn",
        "    0.5 us in 1 gaps: attn -> gemm",
    ]
