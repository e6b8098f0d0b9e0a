"""Engine replicas (issue #19): what 1 and 4 viewers get from a worker with 1 and with N engine replicas, in
one run, through the worker's real ``/ws`` on loopback, driven like the studio drives it
(``bench.loadgen``: the ack flow control, paced as ``ready.pace`` asks).

    python -m bench.replicas                                     # preview engine on the CPU, 1 and 2 replicas
    python -m bench.replicas --engine flux2 --weights random     # flux2, 1 and every visible CUDA device
    python -m bench.replicas --engine flux2 --devices cuda:0,cuda:1 --mode exact --seconds 10
    python -m bench.gpu --sections replicas                      # the same, as a section of the GPU bench

Each case is a fresh worker (``create_inference_app`` in a uvicorn thread of this process, a random
STREAM_SECRET, no usage reporting, no admission floor) whose replicas are all warm before the sessions
start. Per case: delivered FPS (all sessions together, and each), send-to-receive latency p50/p95 pooled
over every delivered frame, fairness (the slowest session's rate over the fair share), how long frames
waited for a replica, the render time, and the worker's own count of frames dropped as late (a newer
frame of the session finished first on another replica) and replaced at input. The summary compares N
replicas with 1 against issue #19's targets: one session >= 1.8x the frames per second at <= 1.2x the p50
latency, four sessions >= 1.9x the aggregate.

The preview engine stands in for a GPU with ``--preview-delay`` seconds per frame (a sleep: replicas
overlap as GPUs do), plus its filters' CPU time, which replicas share with everything else on a CPU: its
figures show the dispatcher, not a GPU's speed-up. Nothing here chooses a GPU: ``--devices`` (default
every visible CUDA device, else ``cpu,cpu``) does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from bench import loadgen
from inference.protocol import TYPICAL_CAMERA_FPS

# Issue #19's targets for N replicas against one (stated for 2 H200s).
MIN_SOLO_SPEEDUP: Final = 1.8
MAX_SOLO_LATENCY_RATIO: Final = 1.2
MIN_SHARED_SPEEDUP: Final = 1.9
DEFAULT_SESSIONS: Final = (1, 4)


@dataclass(frozen=True)
class ReplicaBench:
    """What every case of one run shares: the engine and its settings, the load, how long each case runs."""

    engine: str = "preview"  # "preview" or "flux2"
    devices: tuple[str, ...] = ("cpu", "cpu")  # flux2: one replica per entry; preview: only the count
    weights: str = "random"  # flux2: "pretrained", "random" or "tiny"
    model: str | None = None  # flux2: a checkpoint (repo id or path) with weights "pretrained"
    cache_dir: str | None = None
    compile: bool | None = None  # flux2: None is the engine's default (on CUDA, compiled)
    mode: str = ""  # the sessions' mode ("": the engine's default)
    steps: int = 2
    preview_delay: float = 0.1
    seconds: float = 8.0
    camera_fps: float = 30.0
    ready_timeout: float = 1800.0


def worker_config(bench: ReplicaBench, replicas: int, secret: str) -> Any:
    """The worker of one case: `replicas` replicas (the first `replicas` devices)."""
    from inference.config import WorkerConfig

    values: dict[str, Any] = {
        "stream_secret": secret,
        "engine": bench.engine,
        "worker_id": f"bench-replicas-{replicas}",
        "usage_report_url": None,
        "default_steps": bench.steps,
        # Every case measures what its sessions get: none may be refused.
        "min_session_fps": 1e-3,
    }
    if bench.engine == "flux2":
        values |= {
            "devices": ",".join(bench.devices[:replicas]),
            "weights": bench.weights,
            "compile": bench.compile,
            "cache_dir": bench.cache_dir,
        }
        if bench.mode:  # compile only the measured mode
            values["modes"] = bench.mode
        if bench.model:
            values["model_id"] = bench.model
    else:
        values |= {"preview_replicas": replicas, "preview_delay_seconds": bench.preview_delay}
    return WorkerConfig(**values)


def measure_case(bench: ReplicaBench, replicas: int, sessions: int) -> dict[str, Any]:
    """One worker with `replicas` replicas, `sessions` viewers for `bench.seconds`."""
    from bench.system import _LoopbackServer
    from inference.server import create_inference_app
    from inference.worker import WorkerStatus

    secret = secrets.token_urlsafe(48)
    app = create_inference_app(worker_config(bench, replicas, secret))
    worker = app.state.worker
    started = time.perf_counter()
    with _LoopbackServer(app) as server:
        deadline = time.monotonic() + bench.ready_timeout
        while worker.status is not WorkerStatus.READY or worker.scheduler.ready_replicas < replicas:
            failed = [r for r in worker.replica_report() if r["state"] == "failed"]
            if worker.status is WorkerStatus.FAILED or failed or time.monotonic() > deadline:
                reason = worker.failure or (failed and failed[0].get("error")) or "not ready in time"
                raise RuntimeError(f"the {replicas}-replica worker is not ready: {reason}")
            time.sleep(0.05)
        ready_s = time.perf_counter() - started
        url = f"ws://127.0.0.1:{server.port}/ws"
        result = asyncio.run(
            loadgen.run_load(
                url,
                secret,
                sessions=sessions,
                seconds=bench.seconds,
                fps=bench.camera_fps,
                steps=bench.steps,
                mode=bench.mode or None,
            )
        )
        registry = worker.metrics.registry
        late = registry.get_sample_value("stylecast_worker_frames_dropped_total", {"stage": "late"}) or 0.0
        replaced = (
            registry.get_sample_value("stylecast_worker_frames_dropped_total", {"stage": "input"}) or 0.0
        )
        frames_per_replica = [int(r["frames"]) for r in worker.replica_report()]
    rates = [float(session["fps"]) for session in result["per_session"]]
    return {
        "replicas": replicas,
        "sessions": sessions,
        "ready_s": round(ready_s, 2),
        "aggregate_fps": sum(rates),
        "per_session_fps": rates,
        "fairness": float(result["min_session_share"]),
        "latency_p50_ms": _finite(result["latency_p50_ms"]),
        "latency_p95_ms": _finite(result["latency_p95_ms"]),
        "wait_ms_p50": _finite(result["wait_ms_p50"]),
        "render_ms_p50": _finite(result["render_ms_p50"]),
        "late_frames": int(late),
        "replaced_frames": int(replaced),
        "frames_per_replica": frames_per_replica,
        "pacing": all(result["pacing"]),
        "loadgen": result,
        "error": None,
    }


def measure_replicas(
    bench: ReplicaBench, *, counts: Sequence[int] | None = None, sessions: Sequence[int] = DEFAULT_SESSIONS
) -> dict[str, Any]:
    """Every (replicas, sessions) case, 1 and N replicas by default (N: the devices); a case that fails is
    recorded with its error and the others still run. Returns the section's record, with its table and
    the summary against the targets."""
    replica_counts = list(dict.fromkeys(counts or (1, len(bench.devices))))
    runs: list[dict[str, Any]] = []
    for replicas in replica_counts:
        for count in sessions:
            print(f"replicas: {replicas} replica(s), {count} session(s)", flush=True)
            try:
                runs.append(measure_case(bench, replicas, count))
            except Exception as error:  # one failing case must not cost the others
                message = f"{type(error).__name__}: {error}"
                runs.append({"replicas": replicas, "sessions": count, "error": message})
    summary = summarize(runs)
    return {
        "kind": "replicas",
        "engine": bench.engine,
        "devices": list(bench.devices),
        "weights": bench.weights if bench.engine == "flux2" else None,
        "mode": bench.mode,
        "steps": bench.steps,
        "preview_delay_s": bench.preview_delay if bench.engine == "preview" else None,
        "seconds": bench.seconds,
        "camera_fps": bench.camera_fps,
        "runs": runs,
        "summary": summary,
        "table": format_table(runs) + format_summary(summary),
    }


def _find(runs: Sequence[dict[str, Any]], replicas: int, sessions: int) -> dict[str, Any] | None:
    for run in runs:
        if run["replicas"] == replicas and run["sessions"] == sessions and run.get("error") is None:
            return run
    return None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The most replicas measured against one: speed-ups and latency ratio, each with its target."""
    counts = sorted({run["replicas"] for run in runs})
    if len(counts) < 2 or counts[0] != 1:
        return {"replicas": counts, "note": "needs a run with 1 replica and one with more"}
    most = counts[-1]
    summary: dict[str, Any] = {"replicas": most}
    solo_one, solo_most = _find(runs, 1, 1), _find(runs, most, 1)
    if solo_one and solo_most and solo_one["aggregate_fps"] > 0:
        speedup = solo_most["aggregate_fps"] / solo_one["aggregate_fps"]
        summary["solo_speedup"] = speedup
        summary["solo_speedup_met"] = speedup >= MIN_SOLO_SPEEDUP
        if solo_one["latency_p50_ms"] and solo_most["latency_p50_ms"] is not None:
            ratio = solo_most["latency_p50_ms"] / solo_one["latency_p50_ms"]
            summary["solo_latency_ratio"] = ratio
            summary["solo_latency_met"] = ratio <= MAX_SOLO_LATENCY_RATIO
    shared = max((count for count in {run["sessions"] for run in runs} if count > 1), default=None)
    if shared is not None:
        shared_one, shared_most = _find(runs, 1, shared), _find(runs, most, shared)
        if shared_one and shared_most and shared_one["aggregate_fps"] > 0:
            speedup = shared_most["aggregate_fps"] / shared_one["aggregate_fps"]
            summary["shared_sessions"] = shared
            summary["shared_speedup"] = speedup
            summary["shared_speedup_met"] = speedup >= MIN_SHARED_SPEEDUP
            summary["shared_fairness"] = shared_most["fairness"]
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'replicas':>8s} {'sessions':>8s} {'fps':>7s} {'per session':>21s} {'p50 ms':>7s} {'p95 ms':>7s} "
        f"{'wait ms':>7s} {'render':>7s} {'fairness':>8s} {'late':>5s} {'replaced':>8s}"
    ]
    for run in runs:
        if run.get("error") is not None:
            lines.append(f"{run['replicas']:8d} {run['sessions']:8d}  ERROR {run['error']}")
            continue
        per_session = " ".join(f"{rate:.1f}" for rate in run["per_session_fps"])
        lines.append(
            f"{run['replicas']:8d} {run['sessions']:8d} {run['aggregate_fps']:7.2f} {per_session:>21s} "
            f"{_fmt(run['latency_p50_ms'], '7.1f'):>7s} {_fmt(run['latency_p95_ms'], '7.1f'):>7s} "
            f"{_fmt(run['wait_ms_p50'], '7.1f'):>7s} {_fmt(run['render_ms_p50'], '7.1f'):>7s} "
            f"{run['fairness']:8.2f} {run['late_frames']:5d} {run['replaced_frames']:8d}"
        )
    return lines


def format_summary(summary: dict[str, Any]) -> list[str]:
    if "note" in summary:
        return [f"replicas summary: {summary['note']}"]
    most = summary["replicas"]
    lines = []
    if "solo_speedup" in summary:
        lines.append(
            f"1 session, {most} replicas vs 1: {summary['solo_speedup']:.2f}x the FPS "
            f"(target >= {MIN_SOLO_SPEEDUP}x: {'met' if summary['solo_speedup_met'] else 'not met'})"
        )
    if "solo_latency_ratio" in summary:
        lines.append(
            f"1 session, {most} replicas vs 1: p50 latency {summary['solo_latency_ratio']:.2f}x "
            f"(target <= {MAX_SOLO_LATENCY_RATIO}x: {'met' if summary['solo_latency_met'] else 'not met'})"
        )
    if "shared_speedup" in summary:
        lines.append(
            f"{summary['shared_sessions']} sessions, {most} replicas vs 1: {summary['shared_speedup']:.2f}x "
            f"the aggregate FPS (target >= {MIN_SHARED_SPEEDUP}x: "
            f"{'met' if summary['shared_speedup_met'] else 'not met'}), "
            f"fairness {summary['shared_fairness']:.2f}"
        )
    return lines


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def default_devices(engine: str) -> tuple[str, ...]:
    """Every visible CUDA device for flux2 (when there are any), else two CPU replicas."""
    if engine == "flux2":
        import torch

        count = torch.cuda.device_count()
        if count:
            return tuple(f"cuda:{index}" for index in range(max(count, 1)))
    return ("cpu", "cpu")


def replicas_section(args: argparse.Namespace) -> dict[str, Any]:
    """The section of ``bench.gpu``: flux2 with that bench's weights, 1 and every visible CUDA device (a
    machine with one GPU measures the single-replica case alone), its first system mode and step count."""
    devices = default_devices("flux2") if not args.tiny else ("cpu", "cpu")
    modes = args.system_modes or ["exact"]
    bench = ReplicaBench(
        engine="flux2",
        devices=devices,
        weights="tiny" if args.tiny else ("pretrained" if args.model else "random"),
        model=args.model,
        cache_dir=args.cache_dir,
        compile=args.compile,
        mode=modes[0],
        steps=args.steps[0],
        seconds=args.seconds,
    )
    return measure_replicas(bench)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replicas",
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--engine", choices=("preview", "flux2"), default="preview")
    parser.add_argument(
        "--devices", default=None, help="comma-separated; default: every CUDA device, or cpu,cpu"
    )
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=None, help="replica counts (default: 1 and N)"
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=list(DEFAULT_SESSIONS))
    parser.add_argument("--weights", choices=("pretrained", "random", "tiny"), default="random")
    parser.add_argument("--model", default=None, help="flux2 checkpoint (with --weights pretrained)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--mode", default="", help="the sessions' mode (default: the engine's first)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--preview-delay", type=float, default=0.1, help="preview: seconds per frame")
    parser.add_argument("--seconds", type=float, default=8.0, help="per case")
    parser.add_argument(
        "--fps", type=float, default=float(TYPICAL_CAMERA_FPS), help="camera frames per second"
    )
    parser.add_argument("--out", default="bench/results", help="folder for the JSON record ('' for none)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    devices = (
        tuple(d.strip() for d in args.devices.split(",")) if args.devices else default_devices(args.engine)
    )
    counts = args.replicas or [1, len(devices)]
    if max(counts) > len(devices) and args.engine == "flux2":
        raise SystemExit(f"--replicas {max(counts)} needs as many --devices (have {len(devices)})")
    if args.engine == "preview" and max(counts) > len(devices):
        devices = ("cpu",) * max(counts)
    bench = ReplicaBench(
        engine=args.engine,
        devices=devices,
        weights=args.weights,
        model=args.model,
        cache_dir=args.cache_dir,
        compile=args.compile,
        mode=args.mode,
        steps=args.steps,
        preview_delay=args.preview_delay,
        seconds=args.seconds,
        camera_fps=args.fps,
    )
    started = datetime.now(UTC)
    record = {
        "started": started.isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        **measure_replicas(bench, counts=counts, sessions=args.sessions),
    }
    print("\n".join(record["table"]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{started:%Y%m%dT%H%M%S}-replicas-{args.engine}.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        record["path"] = str(path)
        print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
