"""Where the device sits idle inside one profiled pass: its window, busy and idle time, and the gaps.

The operator table of ``bench.gpu --profile`` sums kernel time; the wall time of a replayed frame is
longer, and the difference is time with the device idle. This module places it: the device's window
(first device activity's start to the last one's end), the time busy (the union of the kernel, memcpy
and memset intervals, overlapping ones merged), the idle rest, the host time before the first and after
the last device activity, and every gap between busy stretches, as a histogram, the largest ones with
their neighbours' names, and totals per (before, after) pair: one frame's boundaries repeat once per
block and step, so a pair that costs a little each time adds up.

``summarize`` is a pure function over :class:`Interval` lists; ``intervals_from_events`` turns the
events of a ``torch.profiler.profile`` into such a list.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_KINDS = ("kernel", "memcpy", "memset")
HOST = "host"
NO_DEVICE_ACTIVITY = "no device activity: the pass ran on the host only (no kernel, memcpy or memset)"

# Upper bounds (µs, inclusive) of the gap histogram's buckets; the last one is open.
GAP_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<=2us", 2.0),
    ("2-10us", 10.0),
    ("10-100us", 100.0),
    ("100us-1ms", 1_000.0),
    (">1ms", float("inf")),
)
LARGEST_GAPS = 15
TOP_PAIRS = 10
NAME_CHARS = 80

# torch's activity types of the device-side work that occupies the device; the device also reports
# ranges that only annotate it ("gpu_user_annotation": a record_function range, or torch.compile's own
# "Torch-Compiled Region", projected onto the stream, spanning kernels and the gaps between them) and
# synchronisation records, which are no work.
_DEVICE_ACTIVITY_TYPES = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}
# Host-side records that are the profiler's own bookkeeping, not the pass: by activity type, and by name
# for a torch whose events carry no activity type (2.11's FunctionEvent has none).
_HOST_SKIPPED_TYPES = {"overhead"}
_HOST_SKIPPED_NAMES = {"Activity Buffer Request"}


@dataclass(frozen=True)
class Interval:
    """One activity of a profiled pass: ``kind`` is one of DEVICE_KINDS or HOST; times in µs."""

    name: str
    start_us: float
    end_us: float
    kind: str


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def _us(value: float) -> float:
    return round(value, 3)


def _ms(value_us: float) -> float:
    return round(value_us / 1_000, 4)


def _bucket(gap_us: float) -> str:
    for label, bound in GAP_BUCKETS:
        if gap_us <= bound:
            return label
    raise AssertionError("the last bucket is open")


def summarize(intervals: Sequence[Interval]) -> dict[str, Any]:
    """The device's busy and idle time in one pass, and the gaps that make up the idle time.

    A gap is the time between the end of one busy stretch (overlapping or touching device activities
    merged) and the start of the next; ``before`` is the activity whose end closes the stretch (the
    latest-ending one), ``after`` the one that opens the next. The gaps add up to ``idle_ms``.
    """
    for interval in intervals:
        if interval.kind not in (*DEVICE_KINDS, HOST):
            raise ValueError(f"unknown interval kind {interval.kind!r} (expected {DEVICE_KINDS} or {HOST!r})")
        if interval.end_us < interval.start_us:
            raise ValueError(f"interval {interval.name!r} ends ({interval.end_us}) before it starts")
    host = [interval for interval in intervals if interval.kind == HOST]
    device = sorted(
        (interval for interval in intervals if interval.kind != HOST), key=lambda i: (i.start_us, i.end_us)
    )
    summary: dict[str, Any] = {
        "host_events": len(host),
        "device_activities": len(device),
        "pass_ms": _ms(max(i.end_us for i in intervals) - min(i.start_us for i in intervals))
        if intervals
        else 0.0,
    }
    if not device:
        summary["note"] = NO_DEVICE_ACTIVITY
        return summary

    window_start = device[0].start_us
    window_end = max(interval.end_us for interval in device)
    by_kind: dict[str, dict[str, float]] = {}
    for kind in DEVICE_KINDS:
        of_kind = [interval for interval in device if interval.kind == kind]
        if of_kind:
            total = sum(interval.end_us - interval.start_us for interval in of_kind)
            by_kind[kind] = {"count": len(of_kind), "total_ms": _ms(total)}

    # One sweep in start order: a gap opens wherever the next activity starts after every earlier one
    # has ended.
    # (gap µs, offset µs from the window's start, before, after)
    gaps: list[tuple[float, float, str, str]] = []
    busy = 0.0
    stretch_start, stretch_end, closing = device[0].start_us, device[0].end_us, device[0].name
    for interval in device[1:]:
        if interval.start_us > stretch_end:
            busy += stretch_end - stretch_start
            gaps.append((interval.start_us - stretch_end, stretch_end - window_start, closing, interval.name))
            stretch_start, stretch_end, closing = interval.start_us, interval.end_us, interval.name
        elif interval.end_us > stretch_end:
            stretch_end, closing = interval.end_us, interval.name
    busy += stretch_end - stretch_start
    window = window_end - window_start

    histogram = {label: {"count": 0, "total_us": 0.0} for label, _ in GAP_BUCKETS}
    pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for gap, _, before, after in gaps:
        bucket = histogram[_bucket(gap)]
        bucket["count"] += 1
        bucket["total_us"] += gap
        pairs[(_short(before), _short(after))].append(gap)
    top_pairs = sorted(pairs.items(), key=lambda item: (-sum(item[1]), item[0]))[:TOP_PAIRS]
    largest = sorted(gaps, key=lambda gap: (-gap[0], gap[1]))[:LARGEST_GAPS]

    host_start = min((interval.start_us for interval in host), default=window_start)
    host_end = max((interval.end_us for interval in host), default=window_end)
    summary.update(
        {
            "window_ms": _ms(window),
            "busy_ms": _ms(busy),
            "idle_ms": _ms(window - busy),
            "idle_fraction": round((window - busy) / window, 4) if window > 0 else 0.0,
            "host_before_device_ms": _ms(max(0.0, window_start - host_start)),
            "host_after_device_ms": _ms(max(0.0, host_end - window_end)),
            "by_kind": by_kind,
            "gaps": len(gaps),
            "gap_histogram": [
                {"bucket": label, "count": int(bucket["count"]), "total_us": _us(bucket["total_us"])}
                for label, bucket in histogram.items()
            ],
            "largest_gaps": [
                {
                    "gap_us": _us(gap),
                    "offset_us": _us(offset),
                    "before": _short(before),
                    "after": _short(after),
                }
                for gap, offset, before, after in largest
            ],
            "gap_pairs": [
                {
                    "before": before,
                    "after": after,
                    "count": len(values),
                    "total_us": _us(sum(values)),
                    "mean_us": _us(sum(values) / len(values)),
                }
                for (before, after), values in top_pairs
            ],
        }
    )
    return summary


def _event_kind(
    device_type: Any, activity_type: str | None, name: str, is_user_annotation: bool = False
) -> str | None:
    """HOST, a DEVICE_KINDS entry, or None for a record that is neither host work nor device work."""
    on_host = getattr(device_type, "name", str(device_type)).upper().endswith("CPU")
    if activity_type is not None:
        if on_host:
            return None if activity_type in _HOST_SKIPPED_TYPES else HOST
        return _DEVICE_ACTIVITY_TYPES.get(activity_type)
    # A torch whose events carry no activity type: what the name and the annotation flag tell.
    if on_host:
        return None if name in _HOST_SKIPPED_NAMES else HOST
    if is_user_annotation:
        return None
    if name.startswith("Memcpy"):
        return "memcpy"
    if name.startswith("Memset"):
        return "memset"
    return "kernel"


def intervals_from_events(events: Iterable[Any]) -> list[Interval]:
    """The intervals of ``torch.profiler.profile(...).events()`` (``FunctionEvent``s, times in µs).

    Device-side activities are the events whose ``device_type`` is not the CPU (CUDA, HIP, XPU, ...)
    and whose ``activity_type`` is a kernel, memcpy or memset; every other CPU event is a host range
    except the profiler's own overhead records. Where the events carry no ``activity_type`` (torch 2.11),
    a device event is a kernel unless its name says memcpy or memset or it is a user annotation.
    """
    intervals = []
    for event in events:
        name = str(event.name)
        kind = _event_kind(
            event.device_type,
            getattr(event, "activity_type", None),
            name,
            bool(getattr(event, "is_user_annotation", False)),
        )
        if kind is None:
            continue
        time_range = event.time_range
        intervals.append(Interval(name, float(time_range.start), float(time_range.end), kind))
    return intervals


def format_timeline(summary: dict[str, Any], label: str) -> list[str]:
    """A few lines for the console: the window and its idle time, the host time around it, top pairs."""
    if "window_ms" not in summary:
        return [
            f"  timeline of {label}: {summary.get('note', NO_DEVICE_ACTIVITY)} (pass {summary['pass_ms']} ms)"
        ]
    lines = [
        f"  timeline of {label}: device window {summary['window_ms']} ms, busy {summary['busy_ms']} ms,"
        f" idle {summary['idle_ms']} ms ({summary['idle_fraction']:.1%}) in {summary['gaps']} gaps",
        f"    host before the first device activity {summary['host_before_device_ms']} ms,"
        f" after the last {summary['host_after_device_ms']} ms (pass {summary['pass_ms']} ms)",
    ]
    for pair in summary["gap_pairs"][:3]:
        lines.append(
            f"    {pair['total_us']:.1f} us in {pair['count']} gaps:"
            f" {pair['before'][:50]} -> {pair['after'][:50]}"
        )
    return lines


def write_pass_timeline(profiler: Any, out: Path, label: str) -> dict[str, Any]:
    """Summarize a finished ``torch.profiler.profile`` of one pass into ``timeline-<label>.json`` and
    export its chrome trace as ``trace-<label>.json.gz`` (chrome://tracing and Perfetto read it gzipped);
    returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(intervals_from_events(profiler.events()))
    (out / f"timeline-{label}.json").write_text(json.dumps(summary, indent=2) + "\n")
    # Exported plain, then compressed here: not every torch compresses a ".gz" path itself.
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        plain = Path(scratch) / "trace.json"
        profiler.export_chrome_trace(str(plain))
        with plain.open("rb") as source, gzip.open(out / f"trace-{label}.json.gz", "wb") as target:
            shutil.copyfileobj(source, target)
    return summary
