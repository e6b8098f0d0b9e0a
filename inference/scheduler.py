"""The render loop: one per process, in one dedicated thread, so the asyncio loop never blocks on the engine
and a GPU engine sees every call from the same thread.

Each session has at most one pending frame. A newer frame replaces an unrendered one (latest frame wins),
so a slow engine shows the freshest picture with bounded latency instead of working through a backlog.
Sessions stream at camera rate (the ack flow control in docs/protocol.md), so every streaming session has a
fresh frame waiting whenever a batch ends, and the next batch starts at once.

Every iteration renders the pending frames of the waiting sessions as one batch (up to engine.max_batch).
When more sessions wait than the batch holds, the ones served least recently go first (never served: whose
frame has waited longest). Being served is a place at the back of one line, in the order of the batch, not
a tie with the rest of the batch: otherwise the sessions whose camera happens to tick first after each
batch would win every tie and be served every time. So a session that was just served never jumps ahead of
one still waiting, whatever the arrival pattern: round-robin, each session one frame per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from inference.engines.base import Engine, FrameJob, deferred_warm_ups

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RenderResult:
    job: FrameJob
    jpeg: bytes | None  # None when rendering this frame failed
    render_ms: int  # wall time of the engine call that produced it
    error: str | None = None
    # From the frame's submit to the start of that engine call; negative when the engine sat idle for that
    # long before the frame arrived (it came late for its turn).
    waited_ms: int = 0
    batch_size: int = 1  # frames rendered by that engine call (its render_ms is theirs together)


Deliver = Callable[[RenderResult], None]  # called on the event loop


@dataclass(frozen=True, slots=True)
class _Pending:
    job: FrameJob
    deliver: Deliver
    submitted_at: float  # time.perf_counter()


@dataclass(frozen=True, slots=True)
class SchedulerHooks:
    """Called on the event loop when the engine's state changes, and in the render thread per batch."""

    on_ready: Callable[[Engine], None]
    on_failed: Callable[[BaseException], None]
    on_batch: Callable[[int, float], None] = lambda size, seconds: None


class Scheduler:
    def __init__(self, engine_factory: Callable[[], Engine]) -> None:
        self._engine_factory = engine_factory
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        # When each waiting session's place in line was taken (kept when a newer frame replaces its frame).
        self._waiting_since: dict[str, int] = {}
        # Each session's place in the line of service: larger is served more recently. Forgotten when the
        # session ends (cancel).
        self._last_served: dict[str, int] = {}
        self._arrivals = itertools.count()
        self._services = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hooks: SchedulerHooks | None = None
        self._free_since = 0.0  # render thread only: when the engine last finished a call or a task
        self.engine: Engine | None = None

    def start(self, loop: asyncio.AbstractEventLoop, hooks: SchedulerHooks) -> None:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._loop = loop
        self._hooks = hooks
        self._thread = threading.Thread(target=self._run, name="render-loop", daemon=True)
        self._thread.start()

    def submit(self, job: FrameJob, deliver: Deliver) -> bool:
        """Make `job` its session's pending frame; True when it replaced one that was never rendered."""
        with self._cond:
            replaced = job.session_id in self._pending
            self._pending[job.session_id] = _Pending(job, deliver, time.perf_counter())
            if not replaced:  # replacing a frame keeps its place in line: it does not lose a turn
                self._waiting_since[job.session_id] = next(self._arrivals)
            self._cond.notify()
        return replaced

    def cancel(self, session_id: str) -> None:
        """The session has ended: drop its waiting frame and forget it."""
        with self._cond:
            self._pending.pop(session_id, None)
            self._waiting_since.pop(session_id, None)
            self._last_served.pop(session_id, None)

    @property
    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in flight and end the thread. Blocking: call it via asyncio.to_thread."""
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._waiting_since.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- render thread ----

    def _run(self) -> None:
        assert self._hooks is not None
        try:
            engine = self._engine_factory()
            started = time.perf_counter()
            engine.warm_up()
            log.info(
                "engine %s (%s) ready in %.1f s", engine.name, engine.model, time.perf_counter() - started
            )
        except BaseException as exc:
            log.exception("engine failed to load")
            self._call_soon(self._hooks.on_failed, exc)
            return
        self.engine = engine
        self._call_soon(self._hooks.on_ready, engine)
        # Ready as soon as the first frame can be rendered; what the engine deferred runs only while no
        # frame waits, one task at a time, so it never delays a frame by more than the task in progress.
        deferred = deferred_warm_ups(engine)
        deferred_count, deferred_seconds = len(deferred), 0.0
        self._free_since = time.perf_counter()
        while True:
            with self._cond:
                while not self._pending and not self._stopping and not deferred:
                    self._cond.wait()
                if self._stopping:
                    return
                if self._pending:
                    batch = self._take_batch(engine.max_batch)
                else:
                    batch, task = [], deferred.pop(0)
            if batch:
                self._render(engine, batch)
            else:
                deferred_seconds += self._run_deferred(task)
                self._free_since = time.perf_counter()
                if not deferred:
                    seconds = deferred_seconds
                    log.info("deferred warm-up done: %d tasks in %.1f s", deferred_count, seconds)

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
        chosen = sorted(
            self._pending,
            key=lambda session: (self._last_served.get(session, -1), self._waiting_since[session]),
        )[:size]
        batch = []
        for session in chosen:
            batch.append(self._pending.pop(session))
            del self._waiting_since[session]
            self._last_served[session] = next(self._services)
        return batch

    def _render(self, engine: Engine, batch: list[_Pending]) -> None:
        assert self._hooks is not None
        started = time.perf_counter()
        try:
            outputs = engine.render([item.job for item in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"engine returned {len(outputs)} frames for a batch of {len(batch)}")
        except Exception as exc:
            if len(batch) > 1:
                # One bad frame must not cost everyone else theirs: retry one by one to isolate it.
                for item in batch:
                    self._render(engine, [item])
                return
            job = batch[0].job
            log.warning("render failed for session %s frame %d: %s", job.session_id, job.frame_id, exc)
            failed = RenderResult(job, None, 0, error=str(exc) or type(exc).__name__)
            self._call_soon(batch[0].deliver, failed)
            self._free_since = time.perf_counter()
            return
        finished = time.perf_counter()
        seconds = finished - started
        self._hooks.on_batch(len(batch), seconds)
        render_ms = round(seconds * 1000)
        for item, jpeg in zip(batch, outputs, strict=True):
            if item.submitted_at > self._free_since:  # the engine was idle until this frame came
                waited = self._free_since - item.submitted_at
            else:
                waited = started - item.submitted_at
            result = RenderResult(
                item.job, jpeg, render_ms, waited_ms=round(waited * 1000), batch_size=len(batch)
            )
            self._call_soon(item.deliver, result)
        self._free_since = finished

    def _call_soon(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        # RuntimeError: the event loop is closed, the process is shutting down.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)
