"""Several engine replicas behind one scheduler (issue #19): one session's frames spread over them, sessions
share them fairly, a session's outputs come back in frame order (an overtaken frame is marked late, never
handed on after a newer one), replicas load one at a time and a replica that fails to load is reported.

The engines are small real implementations of the Engine protocol (tests/inference/test_scheduler.py's),
one instance per replica; the scheduler is the real one, with its real threads and event-loop hand-off."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from inference.engines.base import Engine, FrameJob
from inference.scheduler import RenderResult, ReplicaState, Scheduler, SchedulerHooks
from tests.inference.test_scheduler import RecordingEngine, Results, _job


async def _started(engines: Sequence[Engine]) -> Scheduler:
    """Started, with every replica warm (so the figures below are the steady state)."""
    all_ready = asyncio.Event()
    scheduler = Scheduler(*(lambda engine=engine: engine for engine in engines))

    def on_replicas() -> None:
        if scheduler.ready_replicas == len(engines):
            all_ready.set()

    hooks = SchedulerHooks(on_ready=lambda _: None, on_failed=print, on_replicas=on_replicas)
    scheduler.start(asyncio.get_running_loop(), hooks)
    await asyncio.wait_for(all_ready.wait(), 5)
    return scheduler


async def _one_session_streaming(replicas: int, seconds: float, render_seconds: float) -> list[RenderResult]:
    """A session that always has a fresh frame waiting (a camera at 50 fps), for `seconds`."""
    engines = [RecordingEngine(max_batch=1, seconds_per_batch=render_seconds) for _ in range(replicas)]
    scheduler = await _started(engines)
    results = Results()
    deadline = time.monotonic() + seconds
    frame_id = 0
    while time.monotonic() < deadline:
        frame_id += 1
        scheduler.submit(_job("solo", frame_id), results.append)
        await asyncio.sleep(0.02)
    await asyncio.to_thread(scheduler.stop)
    return results.items


class HeldEngine(RecordingEngine):
    """Each render starts (`rendering` says which frame) and then waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__(max_batch=1, seconds_per_batch=0)
        self.rendering: int | None = None
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        with self._lock:
            self.rendering = jobs[0].frame_id
        assert self.gate.wait(5), "never released"
        self.gate.clear()
        with self._lock:
            self.rendering = None
        return super().render(jobs)

    def release(self) -> None:
        self.gate.set()


async def _rendering(engines: Sequence[HeldEngine], frame_id: int) -> HeldEngine:
    """The engine that started rendering `frame_id`, once one has."""

    def find() -> HeldEngine:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for engine in engines:
                if engine.rendering == frame_id:
                    return engine
            time.sleep(0.002)
        raise AssertionError(f"frame {frame_id} never started rendering")

    return await asyncio.to_thread(find)


def test_one_session_alone_gets_the_frame_rate_of_every_replica_together_in_frame_order() -> None:
    one = asyncio.run(_one_session_streaming(1, seconds=2.0, render_seconds=0.1))
    three = asyncio.run(_one_session_streaming(3, seconds=2.0, render_seconds=0.1))
    shown_one = [r for r in one if not r.late]
    shown_three = [r for r in three if not r.late]
    assert 12 <= len(shown_one) <= 22, len(shown_one)  # ~10 a second from one replica
    assert len(shown_three) >= 2.2 * len(shown_one), (len(shown_three), len(shown_one))
    ids = [r.job.frame_id for r in shown_three]
    assert ids == sorted(set(ids)), "outputs in frame order, none twice"
    # Each frame still takes one render, not three: the rate comes from frames rendering side by side.
    assert all(r.render_ms < 250 for r in shown_three)


def test_consecutive_frames_of_one_session_render_on_different_replicas_at_once() -> None:
    async def scenario() -> tuple[list[HeldEngine], list[RenderResult]]:
        engines = [HeldEngine(), HeldEngine()]
        scheduler = await _started(engines)
        results = Results()
        scheduler.submit(_job("s", 1), results.append)
        first = await _rendering(engines, 1)
        # Frame 1 is still rendering: frame 2 starts on the other replica without waiting for it.
        scheduler.submit(_job("s", 2), results.append)
        second = await _rendering(engines, 2)
        assert second is not first
        first.release()
        await results.until(lambda items: len(items) == 1)
        second.release()
        await results.until(lambda items: len(items) == 2)
        await asyncio.to_thread(scheduler.stop)
        return engines, results.items

    engines, results = asyncio.run(scenario())
    assert all(len(engine.batches) == 1 for engine in engines)
    assert [(r.job.frame_id, r.late) for r in results] == [(1, False), (2, False)]


def test_a_frame_overtaken_by_a_newer_one_of_its_session_is_marked_late_not_handed_on_after_it() -> None:
    async def scenario() -> list[RenderResult]:
        engines = [HeldEngine(), HeldEngine()]
        scheduler = await _started(engines)
        results = Results()
        scheduler.submit(_job("s", 1), results.append)
        first = await _rendering(engines, 1)
        scheduler.submit(_job("s", 2), results.append)
        second = await _rendering(engines, 2)
        second.release()  # frame 2 finishes first
        await results.until(lambda items: len(items) == 1)
        first.release()  # then frame 1
        await results.until(lambda items: len(items) == 2)
        # The session's next frame after the late one is handed on as usual.
        scheduler.submit(_job("s", 3), results.append)
        (await _rendering(engines, 3)).release()
        await results.until(lambda items: len(items) == 3)
        await asyncio.to_thread(scheduler.stop)
        return results.items

    results = asyncio.run(scenario())
    assert [(r.job.frame_id, r.late) for r in results] == [(2, False), (1, True), (3, False)]
    assert results[1].jpeg == b"s:1:p"  # rendered fine; only too late to show


def test_late_frames_of_one_session_do_not_touch_another_sessions_order() -> None:
    async def scenario() -> list[RenderResult]:
        engines = [HeldEngine(), HeldEngine()]
        scheduler = await _started(engines)
        results = Results()
        scheduler.submit(_job("x", 5), results.append)
        first = await _rendering(engines, 5)
        scheduler.submit(_job("y", 1), results.append)
        second = await _rendering(engines, 1)
        second.release()  # y's frame finishes before x's older one: different sessions, both shown
        await results.until(lambda items: len(items) == 1)
        first.release()
        await results.until(lambda items: len(items) == 2)
        await asyncio.to_thread(scheduler.stop)
        return results.items

    results = asyncio.run(scenario())
    assert [(r.job.session_id, r.late) for r in results] == [("y", False), ("x", False)]


def test_four_sessions_share_three_replicas_fairly() -> None:
    async def scenario() -> tuple[list[RecordingEngine], list[RenderResult]]:
        engines = [RecordingEngine(max_batch=1, seconds_per_batch=0.03) for _ in range(3)]
        scheduler = await _started(engines)
        results = Results()
        next_id = Counter[str]()

        def resubmit(result: RenderResult) -> None:  # every session always has a new frame ready
            results.append(result)
            session = result.job.session_id
            next_id[session] += 1
            scheduler.submit(_job(session, next_id[session]), resubmit)

        for session in "abcd":
            scheduler.submit(_job(session, 0), resubmit)
        await results.until(lambda items: len(items) >= 120)
        await asyncio.to_thread(scheduler.stop)
        return engines, results.items

    engines, results = asyncio.run(scenario())
    served = Counter(r.job.session_id for r in results[:120])
    assert set(served) == set("abcd")
    assert max(served.values()) - min(served.values()) <= 4, served
    assert all(len(engine.batches) >= 25 for engine in engines), [len(e.batches) for e in engines]
    for session in "abcd":
        ids = [r.job.frame_id for r in results if r.job.session_id == session and not r.late]
        assert ids == sorted(ids)


def test_every_replica_sees_all_its_calls_from_its_own_thread() -> None:
    async def scenario() -> list[RecordingEngine]:
        engines = [RecordingEngine(max_batch=1, seconds_per_batch=0.02) for _ in range(2)]
        scheduler = await _started(engines)
        results = Results()
        for frame_id in range(1, 40):
            scheduler.submit(_job("s", frame_id), results.append)
            await asyncio.sleep(0.012)
        await results.until(lambda items: any(r.job.frame_id == 39 for r in items))
        await asyncio.to_thread(scheduler.stop)
        return engines

    engines = asyncio.run(scenario())
    assert [engine.threads for engine in engines] == [{"render-loop-0"}, {"render-loop-1"}]
    assert all(engine.batches for engine in engines)


class FailingFactory:
    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self) -> Engine:
        raise OSError(self.message)


def test_a_replica_that_fails_to_load_is_reported_while_the_others_serve() -> None:
    async def scenario() -> tuple[list[RenderResult], list[object], list[BaseException]]:
        engine = RecordingEngine(max_batch=1, seconds_per_batch=0.01)
        failed: list[BaseException] = []
        changes: list[object] = []
        ready = asyncio.Event()
        scheduler = Scheduler(FailingFactory("no CUDA device 1"), lambda: engine, labels=["cuda:1", "cuda:0"])
        hooks = SchedulerHooks(
            on_ready=lambda _: ready.set(),
            on_failed=failed.append,
            on_replicas=lambda: changes.append(scheduler.replicas()),
        )
        scheduler.start(asyncio.get_running_loop(), hooks)
        await asyncio.wait_for(ready.wait(), 5)
        results = Results()
        for frame_id in (1, 2, 3):
            scheduler.submit(_job("s", frame_id), results.append)
            await results.until(lambda items, frame_id=frame_id: len(items) == frame_id)
        await asyncio.sleep(0.05)
        statuses = scheduler.replicas()
        await asyncio.to_thread(scheduler.stop)
        return results.items, [changes[-1], statuses], failed

    results, (last_change, statuses), failed = asyncio.run(scenario())
    assert [r.job.frame_id for r in results] == [1, 2, 3]
    assert all(r.jpeg is not None for r in results)
    assert failed == [], "the worker is not failed while a replica serves"
    by_label = {status.label: status for status in statuses}  # type: ignore[attr-defined]
    assert by_label["cuda:1"].state is ReplicaState.FAILED
    assert by_label["cuda:1"].error == "OSError: no CUDA device 1"
    assert by_label["cuda:0"].state is ReplicaState.READY
    assert by_label["cuda:0"].frames == 3
    # The worker heard of the failure (on_replicas), with what /health shows.
    assert {s.label: s.state for s in last_change} == {  # type: ignore[attr-defined]
        "cuda:1": ReplicaState.FAILED,
        "cuda:0": ReplicaState.READY,
    }


def test_when_every_replica_fails_to_load_the_scheduler_reports_failure_once() -> None:
    async def scenario() -> list[BaseException]:
        failed: list[BaseException] = []
        reported = asyncio.Event()

        def on_failed(exc: BaseException) -> None:
            failed.append(exc)
            reported.set()

        scheduler = Scheduler(FailingFactory("first"), FailingFactory("second"))
        scheduler.start(
            asyncio.get_running_loop(), SchedulerHooks(on_ready=lambda _: None, on_failed=on_failed)
        )
        await asyncio.wait_for(reported.wait(), 5)
        await asyncio.sleep(0.1)  # a second report would have come by now
        assert all(status.state is ReplicaState.FAILED for status in scheduler.replicas())
        return failed

    failed = asyncio.run(scenario())
    assert len(failed) == 1
    assert str(failed[0]) in ("first", "second")


class CompilingEngine(RecordingEngine):
    """Records when its warm-up and deferred warm-ups (compilation, on a GPU) run, on a shared timeline."""

    def __init__(
        self, name: str, timeline: list[tuple[str, float, float]], lock: threading.Lock, done: threading.Event
    ) -> None:
        super().__init__(max_batch=1, seconds_per_batch=0.01)
        self.label = name
        self.timeline = timeline
        self.lock = lock
        self.done = done  # set once three engines' warm-ups and deferred tasks have all run

    def _compile(self, what: str) -> None:
        started = time.perf_counter()
        time.sleep(0.1)
        with self.lock:
            self.timeline.append((f"{self.label}:{what}", started, time.perf_counter()))
            if len(self.timeline) == 9:
                self.done.set()

    def warm_up(self) -> None:
        self._compile("warm_up")

    def deferred_warm_ups(self) -> list[Callable[[], None]]:
        return [lambda what=what: self._compile(what) for what in ("fast", "turbo")]


def test_replicas_build_warm_up_and_run_deferred_warm_ups_one_at_a_time() -> None:
    """torch.compile is not thread-safe: no two replicas compile at once, and frames still render."""

    async def scenario() -> tuple[list[tuple[str, float, float]], list[RenderResult]]:
        timeline: list[tuple[str, float, float]] = []
        lock, done = threading.Lock(), threading.Event()
        engines = [CompilingEngine(name, timeline, lock, done) for name in ("a", "b", "c")]
        scheduler = await _started(engines)
        results = Results()
        for frame_id in range(1, 6):
            scheduler.submit(_job("s", frame_id), results.append)
            await results.until(lambda items, frame_id=frame_id: len(items) == frame_id)
        assert await asyncio.to_thread(done.wait, 5)
        await asyncio.to_thread(scheduler.stop)
        return timeline, results.items

    timeline, results = asyncio.run(scenario())
    assert len(timeline) == 9  # three warm-ups and six deferred tasks
    spans = sorted((start, end) for _, start, end in timeline)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.005, f"two replicas compiled at once: {timeline}"
    assert [r.job.frame_id for r in results] == [1, 2, 3, 4, 5]
    # Every replica loads before any deferred warm-up: a replica's capacity first, other modes after.
    in_order = [what for what, _, _ in sorted(timeline, key=lambda event: event[1])]
    assert sorted(in_order[:3]) == ["a:warm_up", "b:warm_up", "c:warm_up"], in_order


def test_a_single_replica_keeps_the_render_loop_thread_name_and_needs_a_factory() -> None:
    async def scenario() -> RecordingEngine:
        engine = RecordingEngine(max_batch=1, seconds_per_batch=0.0)
        scheduler = await _started([engine])
        results = Results()
        scheduler.submit(_job("s", 1), results.append)
        await results.until(lambda items: len(items) == 1)
        await asyncio.to_thread(scheduler.stop)
        return engine

    assert asyncio.run(scenario()).threads == {"render-loop"}
    with pytest.raises(ValueError, match="at least one engine factory"):
        Scheduler()


def test_a_late_frame_is_told_the_idle_capacity_as_a_share_of_every_replica() -> None:
    """The pacer (inference/pacing.py) sends sooner by a late frame's negative wait. With two replicas a
    replica idle for 200 ms is 100 ms of the worker's capacity: a one-frame-per-render client moves to one
    frame per half render, not to the camera's rate."""

    async def scenario() -> list[RenderResult]:
        engines = [RecordingEngine(max_batch=1, seconds_per_batch=0.05) for _ in range(2)]
        scheduler = await _started(engines)
        results = Results()
        await asyncio.sleep(0.3)  # both replicas idle
        scheduler.submit(_job("s", 1), results.append)
        await results.until(lambda items: len(items) == 1)
        scheduler.submit(_job("s", 2), results.append)  # at once: the other replica has idled ~50 ms more
        await results.until(lambda items: len(items) == 2)
        await asyncio.to_thread(scheduler.stop)
        return results.items

    first, second = asyncio.run(scenario())
    assert -260 <= first.waited_ms <= -140, first  # ~300 ms idle over 2 replicas
    assert -260 <= second.waited_ms <= -150, second  # the longest idle replica took it: ~350 ms / 2
