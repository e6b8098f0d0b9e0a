"""System-level measurements for ``python -m bench.gpu``: what users see beyond one engine call.

* ``measure_sessions``: N simulated clients (one prompt each) feeding a real ``Scheduler`` around the
  already-loaded engine; per-session and aggregate delivered FPS, fairness, submit-to-deliver latency.
* ``measure_websocket``: the real worker app (``create_inference_app``) served by uvicorn on loopback in
  this process, driven by ``bench.loadgen.run_load`` (JPEG frames at up to ``fps`` a second with the studio's
  flow control and pacing); delivered FPS, send-to-receive latency and each frame's wait next to the
  engine's own time per frame, and optionally the levers (camera rate, per-message deflate).
* ``measure_cold_start``: the pipeline written with ``save_pretrained`` to local disk, then a fresh child
  process (``python -m bench.system cold-start-child``) from process start through
  ``from_pretrained``, the move to the device, ``warm_up()`` and the first frame, once with an empty and
  once with a warm torch.compile cache.

Each returns a JSON-able dict: the measurements, ``targets``, and ``table`` (a header line and one line per
case) for the bench's printed summary. A case that fails records ``error`` instead of ending the run.

Fairness is the slowest session's delivered FPS over the fair share (aggregate FPS / sessions): 1.0 when
every session gets the same rate. Torch, diffusers, litestar and uvicorn are imported inside the
functions: the cold-start child times its own imports, so this module must not import them first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from bench.stack_sampler import StackSampler
from inference.preload import preload_on_gpu
from inference.protocol import TYPICAL_CAMERA_FPS
from inference.readahead import checkpoint_readahead, settle
from inference.start_up_collection import collection_paused, last_collection

if TYPE_CHECKING:
    from inference.engines.base import Engine, FrameJob
    from inference.scheduler import RenderResult

# Taken before anything heavy is imported: the cold-start child's "python" stage ends here.
_STARTED_WALL: Final = time.time()
_STARTED_PERF: Final = time.perf_counter()

# What the worker should reach (docs/performance.md, "Targets").
MIN_SESSION_SHARE: Final = 0.8  # every session >= 0.8x its fair share
MIN_AGGREGATE_VS_SINGLE: Final = 0.9  # aggregate FPS of N sessions >= 0.9x one session's
MIN_DELIVERED_VS_ENGINE: Final = 0.95  # over the socket: delivered FPS >= 0.95x the engine's FPS
MAX_LATENCY_VS_ENGINE: Final = 1.3  # over the socket: p50 latency <= 1.3x the engine's time per call
MAX_COLD_START_WARM_S: Final = 20.0  # process start to first frame with a warm compile cache (issue #18)

COLD_START_MARKER: Final = "COLD_START_RESULT "
# The cold starts measure_cold_start runs: "empty" after emptying the compile caches, "warm" reusing them,
# "warm-no-readahead" as warm without reading the checkpoint ahead during the imports
# (inference/readahead.py), "warm-collecting" as warm with Python's garbage collector left running through
# the start (inference/start_up_collection.py).
# "warm-one-mode": the engine offers its default mode alone, from the same cache (what the other modes'
# copies and set-up add to a start). "warm-one-compile-thread": inductor without its pool of compile
# worker processes (TORCHINDUCTOR_COMPILE_THREADS=1), which it otherwise starts at its first compilation
# and loads cached kernels through. "warm-restored": the local part of a start from a CPU memory snapshot
# (modal_app.py, MODAL_SNAPSHOT=1): the child first does what the snapshot captures (the imports, the
# weights read into host memory by load_on_cpu, no preload onto the GPU), then what a restored container
# still does (the weights moved to the GPU, the warm-up, the first frame), timed from the "snapshot" mark.
COLD_START_RUNS: Final = (
    "empty",
    "warm",
    "warm-no-readahead",
    "warm-collecting",
    "warm-one-mode",
    "warm-one-compile-thread",
    "warm-restored",
)
COLD_START_STAGES: Final = (
    "python",  # interpreter start until this module runs
    "imports",  # torch, diffusers, transformers, the engine
    "snapshot",  # "warm-restored" only: the weights read into host memory (what a CPU snapshot holds)
    "device_init",  # CUDA context
    # On CUDA the checkpoint is read straight into device memory, so from_pretrained holds the disk read.
    "from_pretrained",  # the checkpoint read, its weights on the device
    "to_device",  # the rest of load(): the engine set up (FP8 copy, compilation wrappers)
    "warm_up",  # warm_up(): the default mode compiled for every batch size
    "first_frame",  # the first real frame through render(), its prompt encoded
)
_REPO_ROOT: Final = Path(__file__).resolve().parents[1]


def _percentile(values: Sequence[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _finite(value: object) -> float | None:
    """A number from a loadgen record, None when missing or NaN (its figure for "no frames")."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _camera_jpegs(count: int = 8, width: int = 640, height: int = 480) -> list[bytes]:
    """Moving, textured JPEGs of a laptop camera's size (the engine center-crops and resizes them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    frames = []
    for index in range(count):
        image = Image.fromarray(np.roll(base, shift=index, axis=1))
        buffer = io.BytesIO()
        image.resize((width, height), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=80)
        frames.append(buffer.getvalue())
    return frames


def _frame_job(session: int, frame_id: int, jpeg: bytes, prompt: str, steps: int, mode: str) -> FrameJob:
    from inference.engines.base import FrameJob

    return FrameJob(f"bench-{session}", frame_id, jpeg, prompt, steps, seed=session + 1, mode=mode)


class PrimedEngine:
    """The already-loaded engine as a ``Scheduler`` sees it. ``warm_up()`` does not load or warm the engine
    again; it renders one batch of every size the run can form, with the run's prompts, in the render
    thread. That compiles any batch size not compiled yet and fills the prompt cache before the clock
    starts, and CUDA graphs (recorded per thread) get recorded in the thread that replays them."""

    def __init__(self, engine: Engine, prime_batches: Sequence[Sequence[FrameJob]]) -> None:
        self._engine = engine
        self._prime_batches = [list(batch) for batch in prime_batches]
        self.prime_seconds: float | None = None

    def __getattr__(self, name: str) -> Any:
        # Everything but warm-up is the engine's own: name, model, max_batch, modes, preview, render.
        return getattr(self._engine, name)

    def warm_up(self) -> None:
        started = time.perf_counter()
        for batch in self._prime_batches:
            self._engine.render(batch)
        self.prime_seconds = time.perf_counter() - started

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        return self._engine.render(jobs)


def _batch_sizes(sessions: int, max_batch: int) -> list[int]:
    return list(range(1, min(sessions, max_batch) + 1))


# ---------------------------------------------------------------------------------------------- sessions


@dataclass
class _SessionStats:
    prompt: str
    submitted: int = 0
    replaced: int = 0  # frames a newer one replaced before they were rendered (latest wins)
    errors: int = 0
    submitted_at: dict[int, float] = field(default_factory=dict)
    deliveries: list[tuple[float, float]] = field(default_factory=list)  # (delivered at, latency s)


async def _run_sessions(
    engine: Engine,
    sessions: int,
    *,
    seconds: float,
    settle_seconds: float,
    mode: str,
    steps: int,
    fps: float,
    jpegs: Sequence[bytes],
    ready_timeout: float,
) -> dict[str, Any]:
    from bench.loadgen import PROMPTS
    from inference.scheduler import Scheduler, SchedulerHooks

    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(sessions)]
    primed = PrimedEngine(
        engine,
        [
            [_frame_job(index, 0, jpegs[0], prompts[index], steps, mode) for index in range(size)]
            for size in _batch_sizes(sessions, engine.max_batch)
        ],
    )
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    failure: list[BaseException] = []
    # (size, seconds, finished at), appended by the render thread
    batches: list[tuple[int, float, float]] = []

    def on_failed(exc: BaseException) -> None:
        failure.append(exc)
        ready.set()

    hooks = SchedulerHooks(
        on_ready=lambda _: ready.set(),
        on_failed=on_failed,
        on_batch=lambda size, took: batches.append((size, took, time.perf_counter())),
    )
    scheduler = Scheduler(lambda: primed)  # type: ignore[arg-type, return-value]
    scheduler.start(loop, hooks)
    stats = [_SessionStats(prompt) for prompt in prompts]
    cameras: list[asyncio.Task[None]] = []
    try:
        await asyncio.wait_for(ready.wait(), timeout=ready_timeout)
        if failure:
            raise RuntimeError(f"engine failed to warm up: {failure[0]!r}")

        def deliverer(stat: _SessionStats) -> Callable[[RenderResult], None]:
            def deliver(result: RenderResult) -> None:
                now = time.perf_counter()
                frame_id = result.job.frame_id
                submitted = stat.submitted_at.get(frame_id)
                for pending in [pending for pending in stat.submitted_at if pending <= frame_id]:
                    del stat.submitted_at[pending]
                if result.jpeg is None:
                    stat.errors += 1
                elif submitted is not None:
                    stat.deliveries.append((now, now - submitted))

            return deliver

        interval = 1.0 / fps
        started = time.perf_counter()

        async def camera(index: int) -> None:
            stat = stats[index]
            deliver = deliverer(stat)
            # Cameras are not in phase with each other: spread their ticks over one frame interval.
            next_tick = started + index * interval / sessions
            frame_id = 0
            while True:
                await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
                frame_id += 1
                job = _frame_job(index, frame_id, jpegs[frame_id % len(jpegs)], stat.prompt, steps, mode)
                stat.submitted_at[frame_id] = time.perf_counter()
                stat.submitted += 1
                if scheduler.submit(job, deliver):
                    stat.replaced += 1
                next_tick = max(next_tick + interval, time.perf_counter())

        cameras = [asyncio.create_task(camera(index)) for index in range(sessions)]
        window_start = started + settle_seconds
        window_end = window_start + seconds
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
    finally:
        for task in cameras:
            task.cancel()
        await asyncio.gather(*cameras, return_exceptions=True)
        await asyncio.to_thread(scheduler.stop)

    per_session = []
    all_latencies: list[float] = []
    for index, stat in enumerate(stats):
        latencies = [1000 * latency for at, latency in stat.deliveries if window_start <= at <= window_end]
        all_latencies += latencies
        per_session.append(
            {
                "session": index,
                "prompt": stat.prompt,
                "submitted": stat.submitted,
                "replaced": stat.replaced,
                "errors": stat.errors,
                "delivered": len(latencies),
                "fps": len(latencies) / seconds,
                "latency_p50_ms": _round(_median(latencies)),
                "latency_p95_ms": _round(_percentile(latencies, 0.95)),
            }
        )
    rates = [session["fps"] for session in per_session]
    aggregate = sum(rates)
    fair_share = aggregate / sessions
    for session in per_session:
        session["share"] = session["fps"] / fair_share if fair_share else 0.0
    in_window = [(size, took) for size, took, at in batches if window_start <= at <= window_end]
    sizes = sorted({size for size, _ in in_window})
    return {
        "sessions": sessions,
        "aggregate_fps": aggregate,
        "fair_share_fps": fair_share,
        "fairness": min(rates) / fair_share if fair_share else 0.0,
        "latency_p50_ms": _round(_median(all_latencies)),
        "latency_p95_ms": _round(_percentile(all_latencies, 0.95)),
        "per_session": per_session,
        "batches": {str(size): sum(1 for s, _ in in_window if s == size) for size in sizes},
        "batch_ms_median": {
            str(size): _round(_median([1000 * took for s, took in in_window if s == size])) for size in sizes
        },
        "prime_s": _round(primed.prime_seconds),
    }


def measure_sessions(
    engine: Engine,
    *,
    sessions: Sequence[int] = (1, 2, 4),
    seconds: float,
    mode: str = "",
    steps: int = 2,
    fps: float = TYPICAL_CAMERA_FPS,
    settle_seconds: float = 0.5,
    ready_timeout: float = 900.0,
) -> dict[str, Any]:
    """For each count in ``sessions``: a fresh ``Scheduler`` around ``engine`` (already loaded and warm)
    and that many simulated clients, each with its own prompt and seed, submitting a new frame every camera
    tick at ``fps`` (the scheduler keeps only the latest one per session). Deliveries are counted over
    ``seconds`` after ``settle_seconds``; latency is submit to delivery on the event loop.

    Returns ``{"kind": "sessions", "mode", "steps", "camera_fps", "seconds", "engine", "max_batch",
    "targets", "runs": [{"sessions", "aggregate_fps", "fair_share_fps", "fairness", "vs_single",
    "latency_p50_ms", "latency_p95_ms", "per_session": [{"session", "prompt", "submitted", "replaced",
    "errors", "delivered", "fps", "share", "latency_p50_ms", "latency_p95_ms"}], "batches",
    "batch_ms_median", "prime_s", "meets_targets", "error"}], "table", "error"}``. ``vs_single`` is the
    aggregate over the 1-session run's (None without one); ``batches`` counts the scheduler's batches by
    size within the window. A run that fails has only ``sessions`` and ``error``."""
    jpegs = _camera_jpegs()
    runs: list[dict[str, Any]] = []
    for count in sessions:
        try:
            run = asyncio.run(
                _run_sessions(
                    engine,
                    count,
                    seconds=seconds,
                    settle_seconds=settle_seconds,
                    mode=mode,
                    steps=steps,
                    fps=fps,
                    jpegs=jpegs,
                    ready_timeout=ready_timeout,
                )
            )
            run["error"] = None
        except Exception as error:  # one failing case must not cost the others
            run = {"sessions": count, "error": f"{type(error).__name__}: {error}"}
        runs.append(run)
    single = next((run for run in runs if run["sessions"] == 1 and run["error"] is None), None)
    for run in runs:
        if run["error"] is not None:
            continue
        vs_single = (
            run["aggregate_fps"] / single["aggregate_fps"] if single and single["aggregate_fps"] else None
        )
        run["vs_single"] = vs_single
        run["meets_targets"] = {
            "fairness": run["fairness"] >= MIN_SESSION_SHARE,
            "aggregate": None if vs_single is None else vs_single >= MIN_AGGREGATE_VS_SINGLE,
        }
    header = (
        f"{'sessions':>8s} {'aggregate fps':>13s} {'vs 1':>5s} {'fairness':>8s} {'p50 ms':>7s} "
        f"{'p95 ms':>7s}  per-session fps"
    )
    table = [header]
    for run in runs:
        if run["error"] is not None:
            table.append(f"{run['sessions']:8d}  ERROR {run['error']}")
            continue
        rates = ", ".join(f"{session['fps']:.2f}" for session in run["per_session"])
        table.append(
            f"{run['sessions']:8d} {run['aggregate_fps']:13.2f} {_fmt(run['vs_single'], '5.2f'):>5s} "
            f"{run['fairness']:8.2f} {_fmt(run['latency_p50_ms'], '7.1f'):>7s} "
            f"{_fmt(run['latency_p95_ms'], '7.1f'):>7s}  {rates}"
        )
    return {
        "kind": "sessions",
        "mode": mode,
        "steps": steps,
        "camera_fps": fps,
        "seconds": seconds,
        "engine": engine.model,
        "max_batch": engine.max_batch,
        "targets": {
            "min_session_share": MIN_SESSION_SHARE,
            "min_aggregate_vs_single": MIN_AGGREGATE_VS_SINGLE,
        },
        "runs": runs,
        "table": table,
        "error": None,
    }


# ---------------------------------------------------------------------------------------------- websocket


def _engine_call_ms(
    engine: Engine,
    batch: int,
    *,
    jpeg: bytes,
    prompts: Sequence[str],
    steps: int,
    mode: str,
    iters: int,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Median wall time of ``engine.render`` on ``batch`` jobs, after one untimed call (which may compile):
    ``iters`` calls back to back, and more until ``seconds`` have passed. A GPU held at its power limit
    renders slower after a few seconds than just after a pause, so the rate a worker sustains through a
    case is the rate of calls kept up for as long as the case; ``first_median_ms`` is the median of the
    first ``iters`` calls alone. ``render`` returns encoded bytes, so the device has finished by the time
    it returns."""
    jobs = [_frame_job(index, 0, jpeg, prompts[index % len(prompts)], steps, mode) for index in range(batch)]
    started = time.perf_counter()
    engine.render(jobs)
    first_ms = 1000 * (time.perf_counter() - started)
    times: list[float] = []
    timing_started = time.perf_counter()
    while len(times) < iters or time.perf_counter() - timing_started < seconds:
        started = time.perf_counter()
        engine.render(jobs)
        times.append(1000 * (time.perf_counter() - started))
    return {
        "median_ms": statistics.median(times),
        "first_median_ms": statistics.median(times[:iters]),
        "first_ms": first_ms,
        "calls": len(times),
        "times_ms": times,
    }


class _LoopbackServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of this process, on a port the OS picked, configured
    as ``python -m inference`` configures it; ``options`` overrule that (a lever measured against it)."""

    def __init__(self, app: Any, **options: Any) -> None:
        import uvicorn

        from inference.server import WEBSOCKET_SERVER_OPTIONS

        # Bound here and handed to uvicorn, so no other process can take the port in between.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        settings = {**WEBSOCKET_SERVER_OPTIONS, **options}
        config = uvicorn.Config(app, log_level="warning", lifespan="on", **settings)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="bench-uvicorn", daemon=True
        )

    def __enter__(self) -> _LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the loopback worker did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def measure_websocket(
    engine: Engine,
    *,
    sessions: Sequence[int] = (1, 2, 4),
    seconds: float,
    mode: str = "",
    steps: int = 2,
    fps: float = TYPICAL_CAMERA_FPS,
    engine_iters: int = 5,
    engine_seconds: float | None = None,
    ready_timeout: float = 900.0,
    levers: bool = False,
) -> dict[str, Any]:
    """The worker's real ``/ws`` path on loopback: ``create_inference_app`` with ``engine`` (already loaded
    and warm) in a uvicorn thread of this process, a random STREAM_SECRET, no usage reporting; then
    ``bench.loadgen.run_load`` for each count in ``sessions``, ``seconds`` each, pacing frames as the
    worker's ``ready`` asks (as the studio does). With ``levers``, one session also runs at camera rate
    and against a server with per-message deflate on (``variant`` "camera-rate", "deflate"; the others
    are "shipped").

    First the engine's own time per ``render()`` call is measured here (median of calls on the same
    640x480 camera JPEGs kept up for ``engine_seconds``, a case's ``seconds`` unless given, and at least
    ``engine_iters`` of them; at batch 1 and at each batch size the runs can form): delivered FPS is
    compared with batch 1's sustained rate, the one a worker holds through a case, and p50 latency with
    the call time at the batch size the run forms (min(sessions, max_batch)): with N sessions batched, no
    frame can arrive sooner than its batch's call.

    Returns ``{"kind": "websocket", "mode", "steps", "camera_fps", "seconds", "engine",
    "max_batch", "engine_ms": {batch: {"median_ms", "first_median_ms", "first_ms", "calls", "times_ms"}},
    "engine_fps", "server_ready_s", "targets", "runs": [{"sessions", "variant", "pacing", "aggregate_fps",
    "per_session_fps", "fairness", "latency_p50_ms", "latency_p95_ms", "wait_ms_p50", "render_ms_p50",
    "fps_vs_engine", "latency_vs_engine_frame", "latency_vs_engine_call", "meets_targets", "loadgen",
    "error"}], "table", "error"}``. Latency is pooled over every delivered frame of the run;
    ``wait_ms_p50`` is how long the rendered frames waited for the engine, as the client measured it;
    ``render_ms_p50`` is the render time the worker reported with its output frames; ``loadgen`` is
    run_load's own record. Targets are judged on the shipped runs. When the worker cannot be set up,
    ``error`` says why and ``runs`` is empty."""
    try:
        return _measure_websocket(
            engine,
            sessions=sessions,
            seconds=seconds,
            mode=mode,
            steps=steps,
            fps=fps,
            engine_iters=engine_iters,
            engine_seconds=seconds if engine_seconds is None else engine_seconds,
            ready_timeout=ready_timeout,
            levers=levers,
        )
    except Exception as error:  # the bench's other measurements must survive a broken socket path
        message = f"{type(error).__name__}: {error}"
        return {
            "kind": "websocket",
            "mode": mode,
            "steps": steps,
            "camera_fps": fps,
            "seconds": seconds,
            "runs": [],
            "table": [f"websocket: ERROR {message}"],
            "error": message,
        }


def _websocket_run(
    result: dict[str, Any], *, count: int, variant: str, engine_ms: dict[int, Any], max_batch: int
) -> dict[str, Any]:
    """One run_load result as a row of the websocket section."""
    frame_ms = engine_ms[1]["median_ms"]
    per_session = list(result.get("per_session", []))
    rates = [float(session["fps"]) for session in per_session]
    aggregate = sum(rates)
    fair_share = aggregate / count
    p50 = _finite(result.get("latency_p50_ms"))
    p95 = _finite(result.get("latency_p95_ms"))
    call_ms = engine_ms[min(count, max_batch)]["median_ms"]
    fps_vs_engine = aggregate * frame_ms / 1000.0
    return {
        "sessions": count,
        "variant": variant,
        "pacing": all(result.get("pacing") or [False]),
        "aggregate_fps": aggregate,
        "per_session_fps": rates,
        "fairness": min(rates) / fair_share if fair_share else 0.0,
        "latency_p50_ms": _round(p50),
        "latency_p95_ms": _round(p95),
        "wait_ms_p50": _round(_finite(result.get("wait_ms_p50"))),
        "render_ms_p50": _finite(result.get("render_ms_p50")),
        "fps_vs_engine": fps_vs_engine,
        "latency_vs_engine_frame": None if p50 is None else p50 / frame_ms,
        "latency_vs_engine_call": None if p50 is None else p50 / call_ms,
        "meets_targets": {
            "fps": fps_vs_engine >= MIN_DELIVERED_VS_ENGINE,
            "latency": p50 is not None and p50 <= MAX_LATENCY_VS_ENGINE * call_ms,
        },
        "loadgen": result,
        "error": None,
    }


def _measure_websocket(
    engine: Engine,
    *,
    sessions: Sequence[int],
    seconds: float,
    mode: str,
    steps: int,
    fps: float,
    engine_iters: int,
    engine_seconds: float,
    ready_timeout: float,
    levers: bool,
) -> dict[str, Any]:
    from bench import loadgen
    from inference.config import ENGINE_NAMES, WorkerConfig
    from inference.server import create_inference_app
    from inference.worker import WorkerStatus

    jpeg = _camera_jpegs(1)[0]
    sizes = sorted({1, *(min(count, engine.max_batch) for count in sessions)})
    engine_ms = {
        size: _engine_call_ms(
            engine,
            size,
            jpeg=jpeg,
            prompts=loadgen.PROMPTS,
            steps=steps,
            mode=mode,
            iters=engine_iters,
            seconds=engine_seconds,
        )
        for size in sizes
    }
    frame_ms = engine_ms[1]["median_ms"]
    engine_fps = 1000.0 / frame_ms

    primed = PrimedEngine(
        engine,
        [
            [
                _frame_job(index, 0, jpeg, loadgen.PROMPTS[index % len(loadgen.PROMPTS)], steps, mode)
                for index in range(size)
            ]
            for size in _batch_sizes(max(sessions), engine.max_batch)
        ],
    )
    config = WorkerConfig(
        stream_secret=secrets.token_urlsafe(48),
        engine=engine.name if engine.name in ENGINE_NAMES else "preview",
        worker_id="bench",
        usage_report_url=None,
        default_steps=steps,
        max_batch=engine.max_batch,
        # The section measures what N sessions get from one engine, so none of them may be refused.
        min_session_fps=1e-3,
    )
    # (variant, sessions, pacing override, per-message deflate on the server), in the order they run; each
    # server setting gets its own worker, so one lever's worker never serves another's runs.
    cases: list[tuple[str, int, bool | None, bool]] = [("shipped", count, None, False) for count in sessions]
    if levers:
        cases += [("camera-rate", 1, False, False), ("deflate", 1, None, True)]
    runs: list[dict[str, Any]] = []
    server_ready_s = None
    for deflate in dict.fromkeys(case[3] for case in cases):
        server_cases = [case for case in cases if case[3] == deflate]
        app = create_inference_app(config, engine_factory=lambda: primed)  # type: ignore[arg-type, return-value]
        worker = app.state.worker
        started = time.perf_counter()
        with _LoopbackServer(app, ws_per_message_deflate=deflate) as server:
            deadline = time.monotonic() + ready_timeout
            while worker.status is not WorkerStatus.READY:
                if worker.status is WorkerStatus.FAILED or time.monotonic() > deadline:
                    reason = worker.failure or f"still {worker.status} after {ready_timeout:.0f} s"
                    raise RuntimeError(f"the loopback worker is not ready: {reason}")
                time.sleep(0.05)
            if server_ready_s is None:
                server_ready_s = time.perf_counter() - started
            url = f"ws://127.0.0.1:{server.port}/ws"
            for variant, count, pacing, _ in server_cases:
                load = {"sessions": count, "seconds": seconds, "fps": fps, "steps": steps}
                try:
                    result = asyncio.run(
                        loadgen.run_load(url, config.stream_secret, **load, mode=mode or None, pacing=pacing)
                    )
                except Exception as error:  # one failing case must not cost the others
                    message = f"{type(error).__name__}: {error}"
                    runs.append({"sessions": count, "variant": variant, "error": message})
                    continue
                runs.append(
                    _websocket_run(
                        result, count=count, variant=variant, engine_ms=engine_ms, max_batch=engine.max_batch
                    )
                )
    header = (
        f"{'sessions':>8s} {'variant':>11s} {'delivered fps':>13s} {'vs engine':>9s} {'p50 ms':>7s} "
        f"{'p95 ms':>7s} {'wait ms':>7s} {'p50/call':>8s} {'fairness':>8s}  "
        f"(engine: {frame_ms:.1f} ms = {engine_fps:.2f} fps at batch 1 over {engine_ms[1]['calls']} calls; "
        f"its first {engine_iters}: {engine_ms[1]['first_median_ms']:.1f} ms)"
    )
    table = [header]
    for run in runs:
        if run["error"] is not None:
            table.append(f"{run['sessions']:8d} {run['variant']:>11s}  ERROR {run['error']}")
            continue
        table.append(
            f"{run['sessions']:8d} {run['variant']:>11s} {run['aggregate_fps']:13.2f} "
            f"{run['fps_vs_engine']:9.2f} {_fmt(run['latency_p50_ms'], '7.1f'):>7s} "
            f"{_fmt(run['latency_p95_ms'], '7.1f'):>7s} {_fmt(run['wait_ms_p50'], '7.1f'):>7s} "
            f"{_fmt(run['latency_vs_engine_call'], '8.2f'):>8s} {run['fairness']:8.2f}"
        )
    return {
        "kind": "websocket",
        "mode": mode,
        "steps": steps,
        "camera_fps": fps,
        "seconds": seconds,
        "engine": engine.model,
        "max_batch": engine.max_batch,
        "engine_ms": {str(size): timing for size, timing in engine_ms.items()},
        "engine_fps": engine_fps,
        "server_ready_s": None if server_ready_s is None else round(server_ready_s, 2),
        "targets": {
            "min_delivered_vs_engine": MIN_DELIVERED_VS_ENGINE,
            "max_latency_vs_engine_call": MAX_LATENCY_VS_ENGINE,
        },
        "runs": runs,
        "table": table,
        "error": None,
    }


# ---------------------------------------------------------------------------------------------- cold start


def _tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = sizes = 0
    if path.exists():
        for item in path.rglob("*"):
            if item.is_file():
                files += 1
                sizes += item.stat().st_size
    return files, sizes


def _evict_from_page_cache(path: Path) -> bool:
    """Flush the files under ``path`` to disk and ask the kernel to drop them from its page cache, so
    the child reads the checkpoint from disk as a fresh machine would, not from memory. True when every
    file was advised (the kernel may still keep pages that something else maps)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return False
    for item in path.rglob("*"):
        if item.is_file():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
                advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                return False
            finally:
                os.close(fd)
    return True


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def _ending_signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block is left, then deliver them.

    The child is visible (and holding a session of its own) from the fork on, but its ``Popen`` exists only
    once the fork's exec has been confirmed; a signal in between would end the bench with nobody left who
    knows the child's pid. Only the main thread runs Python's signal handlers, so only there can they be held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGTERM, signal.SIGINT)
    previous = {number: signal.signal(number, lambda signum, _: caught.append(signum)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in caught:
            signal.raise_signal(number)


def _spawn_cold_start_child(
    checkpoint: Path, options: dict[str, Any], env: dict[str, str], timeout_s: float
) -> dict[str, Any]:
    spawned_at = time.time()
    process: subprocess.Popen[str] | None = None
    try:
        # Held signals are delivered on leaving the block, inside this try, once `process` is known.
        with _ending_signals_held():
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.system",
                    "cold-start-child",
                    "--model",
                    str(checkpoint),
                    "--options",
                    json.dumps(options),
                    "--spawned-at",
                    repr(spawned_at),
                ],
                cwd=_REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                # Its own process group: a timeout also ends the compile workers inductor forks.
                start_new_session=True,
            )
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        assert process is not None  # only communicate() times out
        _kill_group(process)
        stdout, stderr = process.communicate()
        return {
            "error": f"timed out after {timeout_s:.0f} s",
            "stderr_tail": _tail(stderr),
            "wall_s": round(time.time() - spawned_at, 2),
        }
    except BaseException:
        # The bench itself is ending (SIGTERM from a time limit): the child, in a session of its own, would
        # otherwise go on holding the GPU after the bench has gone.
        if process is not None:
            _kill_group(process)
            process.wait()
        raise
    wall_s = round(time.time() - spawned_at, 2)
    lines = [line for line in stdout.splitlines() if line.startswith(COLD_START_MARKER)]
    if process.returncode != 0 or not lines:
        return {
            "error": f"child exited with {process.returncode}" + ("" if lines else " without a result"),
            "stderr_tail": _tail(stderr),
            "wall_s": wall_s,
        }
    result = json.loads(lines[-1].removeprefix(COLD_START_MARKER))
    result.update(error=None, stderr_tail=None, wall_s=wall_s)
    return result


def measure_cold_start(
    pipeline_or_engine: Any,
    *,
    workdir: str | Path,
    engine_options: dict[str, Any],
    runs: Sequence[str] = ("empty", "warm"),
    release: Callable[[], None] | None = None,
    timeout_s: float = 540.0,
    drop_page_cache: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Cold start of a worker from a local checkpoint.

    The pipeline (a ``Flux2KleinPipeline``, or a ``Flux2Engine``'s, loaded here if needed) is written with
    ``save_pretrained`` (safetensors) to ``workdir/checkpoint``. Then, per entry of ``runs``, a child
    process builds ``create_flux2_engine(model=<checkpoint>, local_files_only=True, **engine_options)``
    (``engine_options`` are ``Flux2Config`` fields) and times its stages from the moment this process
    spawned it (``COLD_START_STAGES``) to the first frame. "empty" runs with a freshly emptied
    torch.compile cache (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR under ``workdir/compile-cache``),
    "warm" with the same cache as the runs before it. With
    ``drop_page_cache`` the checkpoint is evicted from the page cache before each child, so it is read
    from disk. ``release`` is called once before the first child (to free this process's GPU memory).

    Returns ``{"kind": "cold_start", "checkpoint", "checkpoint_files", "checkpoint_bytes", "save_s",
    "sync_s", "engine_options", "page_cache_dropped", "target_warm_s", "runs": [{"cache", "cache_dir",
    "cache_files_before", "cache_files_after", "cache_bytes_after", "marks" (seconds since spawn, per
    stage), "stages" (seconds per stage), "total_s", "first_frame_bytes", "device", "dtype", "torch",
    "peak_gpu_memory_gib", "readahead", "preload" (when each component's weights were on the GPU),
    "text_encoder" (when its read, or after a snapshot its move to the device, began and ended),
    "collections" (the garbage collections until the end of the warm-up: count and seconds),
    "start_up_collection" (the one that ended the collector's pause),
    "wall_s", "error", "stderr_tail", "meets_target"}],
    "table", "notes", "error"}``. A run
    whose child fails has ``error`` and the tail of the child's stderr instead of its stages; ``error`` at
    the top is set only when the checkpoint could not be written."""
    for name in ("model", "local_files_only", "tiny", "random_weights", "pipeline"):
        if name in engine_options:
            raise ValueError(f"engine_options must not set {name!r}: the child loads the saved checkpoint")
    for run in runs:
        if run not in COLD_START_RUNS:
            raise ValueError(f"runs are {', '.join(COLD_START_RUNS)}; got {run!r}")
    pipe = pipeline_or_engine if hasattr(pipeline_or_engine, "save_pretrained") else pipeline_or_engine.load()
    # The engine's FP8 layers (Float8Linear) replace nn.Linear in place: from_pretrained could not load them.
    if any(type(module).__name__.startswith("Float8") for module in pipe.transformer.modules()):
        raise ValueError("the transformer is quantized to FP8 in place; save a pipeline that is not")

    workdir = Path(workdir)
    checkpoint = workdir / "checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        pipe.save_pretrained(checkpoint, safe_serialization=True)
    except Exception as error:  # a full disk must not cost the bench its other measurements
        message = f"{type(error).__name__}: {error}"
        return {
            "kind": "cold_start",
            "checkpoint": str(checkpoint),
            "engine_options": engine_options,
            "runs": [],
            "table": [f"cold start: ERROR writing the checkpoint: {message}"],
            "error": message,
        }
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    os.sync()  # what was written is on disk, not only in the page cache
    sync_s = time.perf_counter() - started
    files, size = _tree_size(checkpoint)

    if release is not None:
        release()
    cache = workdir / "compile-cache"
    env = dict(os.environ)
    env.update(
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TRITON_CACHE_DIR=str(cache / "triton"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    # Inductor's FX-graph and AOT-autograd caches are what a warm start reuses; on unless the caller
    # turned them off.
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    # Python's bytecode cache is a compile cache too: with PYTHONDONTWRITEBYTECODE (or a read-only
    # site-packages) every start compiles torch, diffusers and transformers from source again, seconds that
    # depend on the machine's load. It lives with the other caches, so "empty" starts without it and
    # "warm" reuses it, as a deployed image's compiled bytecode would be.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(cache / "pycache")
    dropped = True
    results: list[dict[str, Any]] = []

    def recorded() -> dict[str, Any]:
        return {
            "kind": "cold_start",
            "checkpoint": str(checkpoint),
            "checkpoint_files": files,
            "checkpoint_bytes": size,
            "save_s": round(save_s, 2),
            "sync_s": round(sync_s, 2),
            "engine_options": engine_options,
            "page_cache_dropped": drop_page_cache and dropped,
            "target_warm_s": MAX_COLD_START_WARM_S,
            "runs": list(results),
            **_cold_start_table(results),
            "error": None,
        }

    for run in runs:
        if run == "empty":
            shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        if drop_page_cache:
            dropped = _evict_from_page_cache(checkpoint) and dropped
        before, _ = _tree_size(cache)
        options = {
            **engine_options,
            "readahead": run != "warm-no-readahead",
            "pause_collector": run != "warm-collecting",
            "one_mode": run == "warm-one-mode",
            "restored": run == "warm-restored",
        }
        run_env = {**env, "TORCHINDUCTOR_COMPILE_THREADS": "1"} if run == "warm-one-compile-thread" else env
        result = _spawn_cold_start_child(checkpoint, options, run_env, timeout_s)
        after, after_bytes = _tree_size(cache)
        result.update(
            cache=run,
            cache_dir=str(cache),
            cache_files_before=before,
            cache_files_after=after,
            cache_bytes_after=after_bytes,
        )
        total = result.get("total_s")
        # A restored start's total includes what the snapshot would have saved; Modal's restore itself is
        # not part of it, so it is not judged against the target (its after_snapshot_s is the figure).
        judged = run not in ("empty", "warm-restored")
        result["meets_target"] = None if not judged or total is None else total <= MAX_COLD_START_WARM_S
        results.append(result)
        if on_run is not None:
            on_run(recorded())
    return recorded()


def _cold_start_table(results: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """The cold starts' table (a row per run, its stages in seconds) and a note per run on its imports."""
    header = (
        f"{'cache':6s} {'python+imports':>14s} {'from_pretrained':>15s} {'to device':>9s} {'warm-up':>8s} "
        f"{'1st frame':>9s} {'total s':>8s} {'then other modes':>16s}"
    )
    table = [header]
    for result in results:
        if result["error"] is not None:
            table.append(f"{result['cache']:6s}  ERROR {result['error']}")
            continue
        stages = result["stages"]
        python_imports = stages["python"] + stages["imports"]
        to_device = stages["device_init"] + stages["to_device"]
        table.append(
            f"{result['cache']:6s} {python_imports:14.1f} {_fmt(stages['from_pretrained'], '15.1f'):>15s} "
            f"{to_device:9.1f} {stages['warm_up']:8.1f} {stages['first_frame']:9.2f} {result['total_s']:8.1f}"
            f" {_fmt(result.get('deferred_warm_up_s'), '16.1f'):>16s}"
        )
    # The imports stage by library (what a bytecode cache, or its absence, moves), and when the text encoder
    # loading beside the rest was done.
    notes = []
    for result in results:
        if result["error"] is not None:
            continue
        note = f"{result['cache']:6s} imports: " + ", ".join(
            f"{name} {seconds:.1f} s" for name, seconds in result.get("imports", {}).items()
        )
        if preload := result.get("preload"):
            note += f"; preload from {preload['started']:.1f} s: " + ", ".join(
                f"{name} {mark:.1f} s" for name, mark in preload["on_device"].items()
            )
        if text := result.get("text_encoder"):
            arrived = "moved to the device" if result["marks"].get("snapshot") is not None else "read"
            note += f"; text encoder {arrived} {text['started']:.1f} -> {text['loaded']:.1f} s"
        if collections := result.get("collections"):
            note += f"; {collections['count']} garbage collections, {collections['seconds']:.2f} s"
        if (after := result.get("after_snapshot_s")) is not None:
            snapshot = result["marks"]["snapshot"]
            note += f"; from the snapshot (at {snapshot:.1f} s) to the first frame {after:.1f} s"
        notes.append(note)
    return {"table": table, "notes": notes}


def _since_spawn(spawned_at: float) -> float:
    return _perf_since_spawn(time.perf_counter(), spawned_at)


def _perf_since_spawn(perf: float, spawned_at: float) -> float:
    # Wall clocks agree across processes; after this module's start the monotonic clock takes over.
    return (_STARTED_WALL - spawned_at) + (perf - _STARTED_PERF)


class _CollectionTimer:
    """A ``gc.callbacks`` entry adding up how many collections ran and how long they took."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started


def cold_start_child(model: str, options: dict[str, Any], spawned_at: float | None) -> dict[str, Any]:
    """The child's side of ``measure_cold_start``: what a freshly started worker does before its first
    frame, with a timestamp (seconds since ``spawned_at``) after each stage."""
    spawned = _STARTED_WALL if spawned_at is None else spawned_at
    marks: dict[str, float | None] = {"python": _STARTED_WALL - spawned}
    options = dict(options)
    # As the worker does (inference.engines): the checkpoint read into the page cache during the imports.
    readahead = checkpoint_readahead(model) if options.pop("readahead", True) else None
    run_deferred = options.pop("deferred_warm_ups", True)
    restored = options.pop("restored", False)
    pause_collector = options.pop("pause_collector", True)
    marks["snapshot"] = None
    collections = _CollectionTimer()
    gc.callbacks.append(collections)

    def paused() -> contextlib.AbstractContextManager[object]:
        return collection_paused() if pause_collector else contextlib.nullcontext()

    # As the worker's scheduler does: the collector paused from the imports to the end of the warm-up (and,
    # as the Modal class's hooks do, once up to the snapshot and once after it).
    with contextlib.ExitStack() as pause:
        pause.enter_context(paused())
        import torch

        import_marks = {"torch": _since_spawn(spawned)}
        # As the worker does (inference.engines): the weights read onto the GPU while diffusers is imported;
        # not while a CPU snapshot is taken (no GPU is attached then).
        preload_started = _since_spawn(spawned)
        preloads = readahead is not None and not restored
        preload = preload_on_gpu(model, options.get("device")) if preloads else None
        import transformers  # noqa: F401 (timed alone: the text encoder's library)

        import_marks["transformers"] = _since_spawn(spawned)
        from diffusers import Flux2KleinPipeline

        import_marks["diffusers"] = _since_spawn(spawned)
        from bench.loadgen import PROMPTS
        from inference.engines.base import FrameJob, deferred_warm_ups
        from inference.engines.flux2 import create_flux2_engine

        marks["imports"] = import_marks["engine"] = _since_spawn(spawned)
        if options.pop("one_mode", False):
            from inference.engines.flux2.recipes import DEFAULT_MODES

            options["modes"] = list(options.get("modes") or DEFAULT_MODES)[:1]
        engine = create_flux2_engine(model=model, local_files_only=True, **options)
        if restored:
            # What Inference.prepare does before Modal takes the snapshot; the pause ends with it.
            engine.load_on_cpu()
            settle()
            pause.close()  # ending with its collection and freeze, as before a snapshot
            marks["snapshot"] = _since_spawn(spawned)
            pause.enter_context(paused())

        def sync() -> None:
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)

        if engine.device.type == "cuda":
            torch.empty(1, device=engine.device)
            sync()
        marks["device_init"] = _since_spawn(spawned)

        # load() is one call (from_pretrained, then the engine's set-up); the loader is wrapped to note when
        # its first half returns, so the engine's own loading code is what gets timed. The text encoder's
        # from_pretrained, on a thread of its own beside the rest (checkpoint.py), is timed by the engine.
        marks["from_pretrained"] = None
        original = Flux2KleinPipeline.from_pretrained
        own = Flux2KleinPipeline.__dict__.get("from_pretrained")
        main_thread = threading.current_thread()

        def timed_from_pretrained(*args: Any, **kwargs: Any) -> Any:
            pipe = original(*args, **kwargs)
            if threading.current_thread() is main_thread:
                marks["from_pretrained"] = _since_spawn(spawned)
            return pipe

        Flux2KleinPipeline.from_pretrained = staticmethod(timed_from_pretrained)  # type: ignore[method-assign, assignment]
        try:
            engine.load()
            sync()
        finally:
            if own is None:
                del Flux2KleinPipeline.from_pretrained
            else:
                Flux2KleinPipeline.from_pretrained = own  # type: ignore[method-assign]
        marks["to_device"] = _since_spawn(spawned)
        text_encoder_load = engine.text_encoder_load
        # Where the warm-up's wall time goes: CPU work on this thread (tracing, cache lookups, captures).
        sampler = StackSampler(threading.current_thread()).start()
        try:
            engine.warm_up()
        finally:
            sampler.stop()
    marks["warm_up"] = _since_spawn(spawned)
    gc.callbacks.remove(collections)
    # A prompt warm_up() did not see: a user's first frame pays for encoding its prompt too.
    job = FrameJob("cold-start", 1, _camera_jpegs(1)[0], PROMPTS[0], engine.config.steps, 1)
    output = engine.render([job])[0]
    sync()
    marks["first_frame"] = _since_spawn(spawned)
    from torch._dynamo.utils import compile_times, counters

    # The compile part of the cold start alone, before the deferred warm-ups add theirs: its time per
    # phase, and how many frames dynamo compiled into how many graphs.
    compiled_by_first_frame = compile_times(repr="str", aggregate=True)
    dynamo_stats_by_first_frame = dict(counters["stats"])
    load_by_first_frame = [round(load, 2) for load in os.getloadavg()]
    # What the worker does next while idle: warm the modes other than the default. After the first frame,
    # so it is reported beside the cold start rather than in it.
    deferred_s: float | None = None
    if run_deferred:
        deferred_started = time.perf_counter()
        for task in deferred_warm_ups(engine):
            task()
        sync()
        deferred_s = time.perf_counter() - deferred_started

    stages: dict[str, float | None] = {}
    previous = 0.0
    for stage in COLD_START_STAGES:
        mark = marks[stage]
        if mark is None:  # the loader was not seen: its time is in the next stage
            stages[stage] = None
            continue
        stages[stage] = round(mark - previous, 3)
        previous = mark
    peak = torch.cuda.max_memory_allocated(engine.device) / 2**30 if engine.device.type == "cuda" else None
    # Where the compile part of the warm-up went, per dynamo phase (seconds in total and per call).
    compiled = compile_times(repr="str", aggregate=True)
    previous_import = marks["python"] or 0.0
    imports: dict[str, float] = {}
    for name, mark in import_marks.items():
        imports[name] = round(mark - previous_import, 3)
        previous_import = mark
    return {
        "marks": {stage: _round(mark, 3) for stage, mark in marks.items()},
        "stages": stages,
        "imports": imports,  # the imports stage by library, in import order
        "bytecode_cache": sys.pycache_prefix,
        "total_s": round(previous, 3),
        # "warm-restored": what a container restored from the snapshot still does, to its first frame.
        "after_snapshot_s": None if marks["snapshot"] is None else round(previous - marks["snapshot"], 3),
        "first_frame_bytes": len(output),
        "deferred_warm_up_s": _round(deferred_s, 3),
        "device": str(engine.device),
        "dtype": str(engine.dtype),
        "torch": torch.__version__,
        "peak_gpu_memory_gib": _round(peak),
        "compile_times": compiled,
        "compile_times_by_first_frame": compiled_by_first_frame,
        "dynamo_stats_by_first_frame": dynamo_stats_by_first_frame,
        "modes": [mode.id for mode in engine.modes],
        # How busy the machine was: the load averages (1, 5, 15 min) at the first frame, and the CPUs.
        "load_average": load_by_first_frame,
        "cpus": os.cpu_count(),
        "warm_up_stacks": sampler.result(),
        # When the weights' preload started, and when each component was on the device (seconds since spawn).
        "preload": None
        if preload is None
        else {
            "started": _round(preload_started, 3),
            "on_device": {
                Path(folder).name: _round(preload_started + seconds, 3)
                for folder, seconds in preload.seconds.items()
            },
        },
        # When the text encoder's load, beside the rest, started and ended (seconds since spawn); None for
        # weights built rather than loaded.
        "text_encoder": None
        if text_encoder_load is None or text_encoder_load.finished is None
        else {
            "started": _round(_perf_since_spawn(text_encoder_load.started, spawned), 3),
            "loaded": _round(_perf_since_spawn(text_encoder_load.finished, spawned), 3),
        },
        # The garbage collections from the imports to the end of the warm-up (the one ending a paused
        # collector among them), and that one alone.
        "collections": {"count": collections.count, "seconds": round(collections.seconds, 3)},
        "start_up_collection": None
        if (collection := last_collection()) is None
        else {
            "seconds": round(collection.seconds, 3),
            "freed": collection.freed,
            "frozen": collection.frozen,
        },
        "readahead": None
        if readahead is None
        else {
            "files": len(readahead.files),
            "bytes": readahead.total_bytes,
            "bytes_read": readahead.bytes_read,
            "seconds": _round(readahead.seconds, 3),
            "skipped": readahead.skipped,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.system", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    child = commands.add_parser("cold-start-child", help="one cold start (spawned by measure_cold_start)")
    child.add_argument("--model", required=True, help="local diffusers checkpoint directory")
    child.add_argument("--options", default="{}", help="Flux2Config fields as JSON")
    child.add_argument("--spawned-at", type=float, default=None, help="the parent's time.time() at spawn")
    args = parser.parse_args(argv)
    result = cold_start_child(args.model, json.loads(args.options), args.spawned_at)
    print(COLD_START_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
