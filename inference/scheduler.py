"""The render loops: one dedicated thread per engine replica (one replica per GPU), so the asyncio loop never
blocks on an engine and each GPU engine sees every call from the same thread.

Each session has at most one pending frame. A newer frame replaces an unrendered one (latest frame wins),
so a slow engine shows the freshest picture with bounded latency instead of working through a backlog.
Sessions stream at camera rate or paced (the ack flow control in docs/protocol.md), so every streaming
session has a fresh frame waiting whenever a replica is free, and the next render starts at once.

Every free replica renders the pending frames of the waiting sessions as one batch (up to its max_batch).
When more sessions wait than the batch holds, the ones served least recently go first (never served: whose
frame has waited longest). Being served is a place at the back of one line, in the order of the batch, not
a tie with the rest of the batch: otherwise the sessions whose camera happens to tick first after each
batch would win every tie and be served every time. So a session that was just served never jumps ahead of
one still waiting, whatever the arrival pattern: round-robin, each session one frame per round.

With several replicas a session's next frame does not wait for its previous one: a session alone on the
worker has a frame rendering on each replica, so its frame rate is the replicas' together while each
frame's latency stays one render. The frame that waits is taken by the replica that has been idle longest
(the waiting threads queue in that order), which spreads one session's frames over every replica. Renders
can finish out of order; a session's outputs are handed on in the order its frames arrived, and a frame
that a newer frame of the same session overtook is marked `late` (the session drops it: latest frame wins).

Building and warming up a replica's engine, and its deferred warm-ups, happen one replica at a time:
torch.compile is not thread-safe. The worker is ready with its first warm replica; the others join as
they finish. A replica that fails to load is reported (`replicas()`, and `on_replicas`); the rest serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from inference.engines.base import Engine, FrameJob, deferred_warm_ups
from inference.start_up_collection import collection_paused

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]
# How long a replica with deferred warm-ups waits before trying again while another replica compiles.
DEFERRED_RETRY_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class RenderResult:
    job: FrameJob
    jpeg: bytes | None  # None when rendering this frame failed
    render_ms: int  # wall time of the engine call that produced it
    error: str | None = None
    # From the frame's submit to the start of that engine call; negative when the engine sat idle for that
    # long before the frame arrived (it came late for its turn), divided by the replicas ready then.
    waited_ms: int = 0
    batch_size: int = 1  # frames rendered by that engine call (its render_ms is theirs together)
    # The replica's time that call took, from when it was free (or, when it idled, the first frame came)
    # to the call's end: the render and what the loop spends around it. What a round of sessions is made
    # of (inference/admission.py), where render_ms alone would promise turns more often than they come.
    cycle_seconds: float = 0.0
    # A newer frame of the same session finished first (on another replica): not to be shown.
    late: bool = False


Deliver = Callable[[RenderResult], None]  # called on the event loop


@dataclass(frozen=True, slots=True)
class _Pending:
    job: FrameJob
    deliver: Deliver
    submitted_at: float  # time.perf_counter()
    order: int  # submission order across all sessions: a session's later frame has a larger one


class ReplicaState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """What /health and the metrics say about one replica."""

    label: str  # its device ("cuda:1"), or "replica N" when the engine chooses
    state: ReplicaState
    error: str | None = None
    frames: int = 0  # frames it has rendered


@dataclass(slots=True)
class _Replica:
    label: str
    factory: EngineFactory
    thread_name: str
    state: ReplicaState = ReplicaState.LOADING
    error: str | None = None
    engine: Engine | None = None
    free_since: float = 0.0  # its render thread only: when it last finished a call or a task
    frames: int = 0  # written by its render thread only


@dataclass(frozen=True, slots=True)
class SchedulerHooks:
    """Called on the event loop when the engines' state changes, and in a render thread per batch."""

    on_ready: Callable[[Engine], None]  # the first replica is warm
    on_failed: Callable[[BaseException], None]  # every replica failed to load (the last one's error)
    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    on_replicas: Callable[[], None] = lambda: None  # a replica became ready or failed: see replicas()


@dataclass(slots=True)
class _Sessions:
    """Per-session bookkeeping, guarded by the scheduler's lock."""

    pending: dict[str, _Pending] = field(default_factory=dict)
    # When each waiting session's place in line was taken (kept when a newer frame replaces its frame).
    waiting_since: dict[str, int] = field(default_factory=dict)
    # Each session's place in the line of service: larger is served more recently. Forgotten when the
    # session ends (cancel).
    last_served: dict[str, int] = field(default_factory=dict)
    # The submission order of the newest frame handed on per session: an older one finishing later is late.
    delivered: dict[str, int] = field(default_factory=dict)


class Scheduler:
    def __init__(self, *engine_factories: EngineFactory, labels: Sequence[str] | None = None) -> None:
        """One replica per factory, each called (then warmed up) in that replica's render thread.
        `labels` name them in /health and the logs (their devices); by default "replica N"."""
        if not engine_factories:
            raise ValueError("a scheduler needs at least one engine factory")
        names = list(labels) if labels is not None else [f"replica {i}" for i in range(len(engine_factories))]
        if len(names) != len(engine_factories):
            raise ValueError("one label per engine factory")
        single = len(engine_factories) == 1
        self._replicas = [
            _Replica(label, factory, "render-loop" if single else f"render-loop-{index}")
            for index, (label, factory) in enumerate(zip(names, engine_factories, strict=True))
        ]
        self._cond = threading.Condition()
        self._sessions = _Sessions()
        self._arrivals = itertools.count()
        self._services = itertools.count()
        self._orders = itertools.count()
        # Held while an engine is built, warmed up or runs a deferred warm-up: one compile at a time.
        self._compile_lock = threading.Lock()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hooks: SchedulerHooks | None = None
        self.engine: Engine | None = None  # the first replica's engine to be ready (modes, adapters, name)
        self._ready_count = 0  # replicas ready; written under the lock, read by the render threads
        # Replicas not loaded yet (nor failed): deferred warm-ups wait for them, a replica's whole capacity
        # being worth more than another mode warmed early.
        self._unloaded = len(self._replicas)

    def start(self, loop: asyncio.AbstractEventLoop, hooks: SchedulerHooks) -> None:
        if self._threads:
            raise RuntimeError("scheduler already started")
        self._loop = loop
        self._hooks = hooks
        for replica in self._replicas:
            thread = threading.Thread(
                target=self._run, args=(replica,), name=replica.thread_name, daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def submit(self, job: FrameJob, deliver: Deliver) -> bool:
        """Make `job` its session's pending frame; True when it replaced one that was never rendered."""
        sessions = self._sessions
        with self._cond:
            replaced = job.session_id in sessions.pending
            sessions.pending[job.session_id] = _Pending(job, deliver, time.perf_counter(), next(self._orders))
            if not replaced:  # replacing a frame keeps its place in line: it does not lose a turn
                sessions.waiting_since[job.session_id] = next(self._arrivals)
            self._cond.notify()
        return replaced

    def cancel(self, session_id: str) -> None:
        """The session has ended: drop its waiting frame and forget it."""
        sessions = self._sessions
        with self._cond:
            sessions.pending.pop(session_id, None)
            sessions.waiting_since.pop(session_id, None)
            sessions.last_served.pop(session_id, None)
            sessions.delivered.pop(session_id, None)

    @property
    def pending_count(self) -> int:
        with self._cond:
            return len(self._sessions.pending)

    def replicas(self) -> list[ReplicaStatus]:
        with self._cond:
            return [ReplicaStatus(r.label, r.state, r.error, r.frames) for r in self._replicas]

    @property
    def ready_replicas(self) -> int:
        with self._cond:
            return self._ready_count

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batches in flight and end the threads. Blocking: call it via asyncio.to_thread."""
        with self._cond:
            self._stopping = True
            self._sessions.pending.clear()
            self._sessions.waiting_since.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- render threads ----

    def _run(self, replica: _Replica) -> None:
        engine = self._load(replica)
        if engine is None:
            return
        # Ready as soon as the first frame can be rendered; what the engine deferred runs only while no
        # frame waits, one task at a time, so it never delays a frame by more than the task in progress.
        deferred = deferred_warm_ups(engine)
        deferred_count, deferred_seconds = len(deferred), 0.0
        replica.free_since = time.perf_counter()
        while True:
            with self._cond:
                while not self._sessions.pending and not self._stopping and not deferred:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._take_batch(engine.max_batch) if self._sessions.pending else []
            if batch:
                self._render(replica, engine, batch)
                continue
            if self._unloaded or not self._compile_lock.acquire(blocking=False):
                # Another replica is loading or compiling: render whatever arrives meanwhile, then try again.
                with self._cond:
                    if not self._sessions.pending and not self._stopping:
                        self._cond.wait(DEFERRED_RETRY_SECONDS)
                continue
            try:
                deferred_seconds += self._run_deferred(deferred.pop(0))
            finally:
                self._compile_lock.release()
            replica.free_since = time.perf_counter()
            if not deferred:
                log.info(
                    "%s: deferred warm-up done: %d tasks in %.1f s",
                    replica.label,
                    deferred_count,
                    deferred_seconds,
                )

    def _load(self, replica: _Replica) -> Engine | None:
        """Build and warm up the replica's engine; None (reported) when it could not."""
        assert self._hooks is not None
        try:
            with self._compile_lock, collection_paused():
                if self._stopping:
                    return None
                engine = replica.factory()
                started = time.perf_counter()
                engine.warm_up()
            log.info(
                "%s: engine %s (%s) ready in %.1f s",
                replica.label,
                engine.name,
                engine.model,
                time.perf_counter() - started,
            )
        except BaseException as exc:
            log.exception("%s: engine failed to load", replica.label)
            with self._cond:
                self._unloaded -= 1
                replica.state = ReplicaState.FAILED
                replica.error = f"{type(exc).__name__}: {exc}"
                none_left = all(r.state is ReplicaState.FAILED for r in self._replicas)
            self._call_soon(self._hooks.on_replicas)
            if none_left:
                self._call_soon(self._hooks.on_failed, exc)
            return None
        with self._cond:
            replica.engine = engine
            replica.state = ReplicaState.READY
            self._ready_count += 1
            self._unloaded -= 1
            first = self.engine is None
            if first:
                self.engine = engine
        if first:
            self._call_soon(self._hooks.on_ready, engine)
        self._call_soon(self._hooks.on_replicas)
        return engine

    def _run_deferred(self, task: Callable[[], None]) -> float:
        """Run one deferred warm-up task; returns the seconds it took."""
        started = time.perf_counter()
        try:
            task()
        except Exception:  # the mode stays cold and compiles on first use, or fails there, per frame
            log.exception("deferred warm-up task failed")
        return time.perf_counter() - started

    def _take_batch(self, size: int) -> list[_Pending]:
        """Up to `size` waiting frames, least recently served sessions first. Call with the lock held."""
        sessions = self._sessions
        chosen = sorted(
            sessions.pending,
            key=lambda session: (sessions.last_served.get(session, -1), sessions.waiting_since[session]),
        )[:size]
        batch = []
        for session in chosen:
            batch.append(sessions.pending.pop(session))
            del sessions.waiting_since[session]
            sessions.last_served[session] = next(self._services)
        return batch

    def _render(self, replica: _Replica, engine: Engine, batch: list[_Pending]) -> None:
        assert self._hooks is not None
        started = time.perf_counter()
        began = max(replica.free_since, min(item.submitted_at for item in batch))
        try:
            outputs = engine.render([item.job for item in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"engine returned {len(outputs)} frames for a batch of {len(batch)}")
        except Exception as exc:
            if len(batch) > 1:
                # One bad frame must not cost everyone else theirs: retry one by one to isolate it.
                for item in batch:
                    self._render(replica, engine, [item])
                return
            job = batch[0].job
            log.warning("render failed for session %s frame %d: %s", job.session_id, job.frame_id, exc)
            self._hand_on([(batch[0], RenderResult(job, None, 0, error=str(exc) or type(exc).__name__))])
            replica.free_since = time.perf_counter()
            return
        finished = time.perf_counter()
        seconds = finished - started
        self._hooks.on_batch(len(batch), seconds)
        replica.frames += len(batch)
        render_ms = round(seconds * 1000)
        results = []
        serving = max(1, self._ready_count)
        for item, jpeg in zip(batch, outputs, strict=True):
            if item.submitted_at > replica.free_since:  # the replica was idle until this frame came
                # As the capacity the worker lost: a replica's idle time is 1/N of the N replicas'. A
                # client pacing one frame per render of one replica, with N of them, sees each idle for
                # (N - 1) renders: its frames are late by that over N, and its pacer sends that much
                # sooner, which is one frame per render / N (inference/pacing.py; N = 1: the idle time).
                waited = (replica.free_since - item.submitted_at) / serving
            else:
                waited = started - item.submitted_at
            result = RenderResult(
                item.job,
                jpeg,
                render_ms,
                waited_ms=round(waited * 1000),
                batch_size=len(batch),
                cycle_seconds=finished - began,
            )
            results.append((item, result))
        self._hand_on(results)
        replica.free_since = finished

    def _hand_on(self, results: list[tuple[_Pending, RenderResult]]) -> None:
        """Deliver results on the event loop, marking those a newer frame of their session overtook.
        Under the lock, so the event loop receives each session's results in the order decided here."""
        if len(self._replicas) == 1:  # one render thread finishes frames in the order it took them
            for item, result in results:
                self._call_soon(item.deliver, result)
            return
        sessions = self._sessions
        with self._cond:
            for item, result in results:
                session = item.job.session_id
                newest = sessions.delivered.get(session)
                if newest is not None and item.order < newest:
                    result = dataclasses.replace(result, late=True)
                elif session in sessions.last_served:  # not after cancel: an ended session is forgotten
                    sessions.delivered[session] = item.order
                self._call_soon(item.deliver, result)

    def _call_soon(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        # RuntimeError: the event loop is closed, the process is shutting down.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)
