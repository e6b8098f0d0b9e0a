"""The render loop on its own: batching across sessions, fairness, latest-frame-wins, failure isolation.

The engine here is a small real implementation of the Engine protocol that records what it was asked to
render; the scheduler under test is the real one, with its real thread and event-loop hand-off."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from inference.engines.base import Engine, FrameJob
from inference.scheduler import RenderResult, Scheduler, SchedulerHooks


class RecordingEngine:
    name = "recording"
    model = "records batches"

    def __init__(
        self, max_batch: int, seconds_per_batch: float = 0.01, fail_frame: int | None = None
    ) -> None:
        self.max_batch = max_batch
        self.seconds_per_batch = seconds_per_batch
        self.fail_frame = fail_frame
        self.batches: list[list[tuple[str, int, str]]] = []
        self.threads: set[str] = set()

    def warm_up(self) -> None:
        self.threads.add(threading.current_thread().name)

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        assert len(jobs) <= self.max_batch
        self.threads.add(threading.current_thread().name)
        if any(job.frame_id == self.fail_frame for job in jobs):
            raise ValueError("cannot decode this frame")
        self.batches.append([(job.session_id, job.frame_id, job.prompt) for job in jobs])
        time.sleep(self.seconds_per_batch)
        return [f"{job.session_id}:{job.frame_id}:{job.prompt}".encode() for job in jobs]


async def _started(engine: Engine) -> Scheduler:
    ready = asyncio.Event()
    scheduler = Scheduler(lambda: engine)
    scheduler.start(
        asyncio.get_running_loop(), SchedulerHooks(on_ready=lambda _: ready.set(), on_failed=print)
    )
    await asyncio.wait_for(ready.wait(), 5)
    return scheduler


def _job(session: str, frame_id: int, prompt: str = "p") -> FrameJob:
    return FrameJob(session, frame_id, b"", prompt, 2, 0)


class Results:
    """Delivered results, with a way to wait until a condition on them holds."""

    def __init__(self) -> None:
        self.items: list[RenderResult] = []
        self._changed = asyncio.Event()

    def append(self, result: RenderResult) -> None:
        self.items.append(result)
        self._changed.set()

    async def until(self, condition: Callable[[list[RenderResult]], bool]) -> None:
        async with asyncio.timeout(5):
            while not condition(self.items):
                self._changed.clear()
                await self._changed.wait()


def test_pending_frames_of_all_sessions_render_as_one_batch_with_their_own_prompts() -> None:
    async def scenario() -> list[RenderResult]:
        engine = RecordingEngine(max_batch=4, seconds_per_batch=0.2)
        scheduler = await _started(engine)
        results = Results()
        scheduler.submit(_job("first", 1, "anime"), results.append)
        await asyncio.sleep(0.05)  # "first" is now rendering alone; the next three queue up meanwhile
        for session, prompt in (("a", "oil"), ("b", "clay"), ("c", "neon")):
            scheduler.submit(_job(session, 1, prompt), results.append)
        await results.until(lambda items: len(items) == 4)
        await asyncio.to_thread(scheduler.stop)
        assert engine.batches[1] == [("a", 1, "oil"), ("b", 1, "clay"), ("c", 1, "neon")]
        return results.items

    results = asyncio.run(scenario())
    assert {(r.job.session_id, r.jpeg) for r in results} == {
        ("first", b"first:1:anime"),
        ("a", b"a:1:oil"),
        ("b", b"b:1:clay"),
        ("c", b"c:1:neon"),
    }


def test_a_newer_frame_replaces_the_pending_one() -> None:
    async def scenario() -> tuple[list[int], list[bool]]:
        engine = RecordingEngine(max_batch=1, seconds_per_batch=0.2)
        scheduler = await _started(engine)
        results = Results()
        replaced = [scheduler.submit(_job("s", 1), results.append)]
        await asyncio.sleep(0.05)  # frame 1 is rendering
        for frame_id in range(2, 101):
            replaced.append(scheduler.submit(_job("s", frame_id), results.append))
            assert scheduler.pending_count == 1
        await results.until(lambda items: any(r.job.frame_id == 100 for r in items))
        await asyncio.to_thread(scheduler.stop)
        return [r.job.frame_id for r in results.items], replaced

    delivered, replaced = asyncio.run(scenario())
    assert delivered == [1, 100]
    assert replaced == [False, False] + [True] * 98


def test_each_result_says_how_long_its_frame_waited_or_how_long_the_engine_idled_for_it() -> None:
    async def scenario() -> dict[int, RenderResult]:
        engine = RecordingEngine(max_batch=1, seconds_per_batch=0.2)
        scheduler = await _started(engine)
        results = Results()
        scheduler.submit(_job("s", 1), results.append)
        await asyncio.sleep(0.05)  # frame 1 is rendering: frame 2 waits for the rest of it, ~150 ms
        scheduler.submit(_job("s", 2), results.append)
        await results.until(lambda items: len(items) == 2)
        await asyncio.sleep(0.1)  # the engine is idle for 100 ms before frame 3 comes
        scheduler.submit(_job("s", 3), results.append)
        await results.until(lambda items: len(items) == 3)
        await asyncio.to_thread(scheduler.stop)
        return {result.job.frame_id: result for result in results.items}

    results = asyncio.run(scenario())
    assert 100 <= results[2].waited_ms <= 200, results[2]
    assert -150 <= results[3].waited_ms <= -80, results[3]  # late by the engine's idle time
    assert all(190 <= result.render_ms <= 300 for result in results.values())


def test_sessions_take_turns_when_there_are_more_than_batch_slots() -> None:
    async def scenario() -> RecordingEngine:
        engine = RecordingEngine(max_batch=2, seconds_per_batch=0.005)
        scheduler = await _started(engine)
        results = Results()

        def resubmit(result: RenderResult) -> None:  # every session always has a new frame ready
            results.append(result)
            scheduler.submit(_job(result.job.session_id, result.job.frame_id + 1), resubmit)

        for session in "abcde":
            scheduler.submit(_job(session, 0), resubmit)
        await results.until(lambda items: len(engine.batches) >= 50)
        await asyncio.to_thread(scheduler.stop)
        return engine

    engine = asyncio.run(scenario())
    served = Counter(session for batch in engine.batches[:50] for session, _, _ in batch)
    assert set(served) == set("abcde")
    assert max(served.values()) - min(served.values()) <= 2, served
    assert all(len(batch) <= 2 for batch in engine.batches)
    assert engine.threads == {"render-loop"}, "all engine work happens in the one render thread"


class GatedEngine(RecordingEngine):
    """Each render waits for the test to open the gate, so the test decides what arrives during a render."""

    def __init__(self, max_batch: int) -> None:
        super().__init__(max_batch, seconds_per_batch=0)
        self.gate = threading.Semaphore(0)
        self.started = threading.Semaphore(0)

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        self.started.release()
        self.gate.acquire(timeout=5)
        return super().render(jobs)

    async def next_render_started(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, True, 5), "no render started"


def test_served_sessions_queue_in_the_order_they_were_served_not_in_the_order_their_frames_arrive() -> None:
    """Camera phases must not pick winners: a session whose next frame always arrives first after a batch
    would otherwise be served every time while another waits (the phase split of first-come-first-served)."""

    async def scenario() -> list[list[str]]:
        engine = GatedEngine(max_batch=2)
        scheduler = await _started(engine)
        results = Results()
        scheduler.submit(_job("x", 1), results.append)
        await engine.next_render_started()  # [x] renders; a, b and c arrive meanwhile
        for session in "abc":
            scheduler.submit(_job(session, 1), results.append)
        engine.gate.release()
        await engine.next_render_started()  # [a, b] renders; c waits; b's next frame arrives before a's
        scheduler.submit(_job("b", 2), results.append)
        scheduler.submit(_job("a", 2), results.append)
        engine.gate.release()
        await engine.next_render_started()  # c (waiting longest), then a: served before b in [a, b]
        scheduler.submit(_job("c", 2), results.append)
        engine.gate.release()
        await engine.next_render_started()
        engine.gate.release()
        await results.until(lambda items: len(items) == 7)
        await asyncio.to_thread(scheduler.stop)
        return [[session for session, _, _ in batch] for batch in engine.batches]

    assert asyncio.run(scenario()) == [["x"], ["a", "b"], ["c", "a"], ["b", "c"]]


def test_one_bad_frame_does_not_cost_the_rest_of_the_batch_their_frames() -> None:
    async def scenario() -> list[RenderResult]:
        engine = RecordingEngine(max_batch=4, seconds_per_batch=0.1, fail_frame=13)
        scheduler = await _started(engine)
        results = Results()
        scheduler.submit(_job("warm", 0), results.append)
        await asyncio.sleep(0.03)  # "warm" is rendering; the next three are batched together
        scheduler.submit(_job("a", 1), results.append)
        scheduler.submit(_job("bad", 13), results.append)
        scheduler.submit(_job("b", 2), results.append)
        await results.until(lambda items: len(items) == 4)
        await asyncio.to_thread(scheduler.stop)
        return results.items

    by_session = {r.job.session_id: r for r in asyncio.run(scenario())}
    assert by_session["a"].jpeg == b"a:1:p"
    assert by_session["b"].jpeg == b"b:2:p"
    assert by_session["bad"].jpeg is None
    assert by_session["bad"].error == "cannot decode this frame"


def test_an_engine_that_fails_to_load_is_reported() -> None:
    def broken() -> Engine:
        raise OSError("weights not found")

    async def scenario() -> BaseException:
        failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        scheduler = Scheduler(broken)
        scheduler.start(
            asyncio.get_running_loop(), SchedulerHooks(on_ready=print, on_failed=failed.set_result)
        )
        return await asyncio.wait_for(failed, 5)

    assert str(asyncio.run(scenario())) == "weights not found"


class DeferringEngine(RecordingEngine):
    """Ready after its first warm-up step; two slow warm-up tasks left for when the loop is idle."""

    def __init__(self) -> None:
        super().__init__(max_batch=1, seconds_per_batch=0.01)
        self.events: list[str] = []
        self.all_warm = threading.Event()

    def warm_up(self) -> None:
        self.events.append("warm_up")

    def deferred_warm_ups(self) -> list[Callable[[], None]]:
        return [lambda name=name: self._deferred(name) for name in ("fast", "turbo")]

    def _deferred(self, name: str) -> None:
        time.sleep(0.3)
        self.events.append(f"deferred:{name}")
        if name == "turbo":
            self.all_warm.set()

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        self.events.append(f"render:{jobs[0].frame_id}")
        return super().render(jobs)


def test_deferred_warm_ups_run_after_ready_and_only_while_no_frame_waits() -> None:
    async def scenario() -> None:
        engine = DeferringEngine()
        ready_at: list[list[str]] = []
        ready = asyncio.Event()

        def on_ready(_: Engine) -> None:
            ready_at.append(list(engine.events))
            ready.set()

        scheduler = Scheduler(lambda: engine)
        scheduler.start(asyncio.get_running_loop(), SchedulerHooks(on_ready=on_ready, on_failed=print))
        await asyncio.wait_for(ready.wait(), 5)
        # Ready before any deferred task: the first frame does not wait for the other modes.
        assert ready_at == [["warm_up"]]
        results = Results()
        await asyncio.sleep(0.1)  # the first deferred task is now running
        started = time.monotonic()
        scheduler.submit(_job("a", 1), results.append)
        await results.until(lambda items: len(items) == 1)
        # The frame waited for the task in progress (0.3 s), not for both tasks.
        assert time.monotonic() - started < 0.5
        assert await asyncio.to_thread(engine.all_warm.wait, 5)
        assert engine.events == ["warm_up", "deferred:fast", "render:1", "deferred:turbo"]
        await asyncio.to_thread(scheduler.stop)

    asyncio.run(scenario())
