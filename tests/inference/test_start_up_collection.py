"""The garbage collector while an engine starts: paused, then one collection that frees what died and a
freeze of what lives (inference/start_up_collection.py), as the worker's scheduler and the Modal class
start their engines."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Iterator, Sequence

import pytest

from inference.engines.base import FrameJob
from inference.scheduler import Scheduler, SchedulerHooks
from inference.start_up_collection import MIN_OBJECTS_TO_COLLECT, collection_paused, last_collection
from tests.collections_probe import Node, full_collections_while_allocating

# As many new objects as an engine's start builds: enough for the collection at the end of the pause.
ENGINE_START_OBJECTS = MIN_OBJECTS_TO_COLLECT + 50_000


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        (gc.enable if enabled else gc.disable)()


def test_no_collection_runs_inside_the_pause_and_what_died_in_it_is_freed_at_its_end() -> None:
    generation_two = []

    def seen(phase: str, info: dict[str, object]) -> None:
        if phase == "stop":
            generation_two.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        with collection_paused():
            assert not gc.isenabled()
            garbage = [Node() for _ in range(ENGINE_START_OBJECTS)]  # as much as an engine's start builds
            gone = weakref.ref(garbage[0])
            del garbage
            assert generation_two == []
            assert gone() is not None  # nothing collects it yet
    finally:
        gc.callbacks.remove(seen)
    assert gone() is None
    # Full collections at the end only: the one that frees, then the near-empty one after the freeze.
    assert generation_two == [2, 2]
    assert gc.isenabled()


def test_what_survives_the_start_is_frozen_and_later_collections_leave_it_alone() -> None:
    with collection_paused():
        engine_state = [Node() for _ in range(ENGINE_START_OBJECTS)]
    collection = last_collection()
    assert collection is not None
    assert collection.frozen >= len(engine_state)
    assert gc.get_freeze_count() >= len(engine_state)
    tracked = {id(obj) for obj in gc.get_objects()}
    assert id(engine_state[0]) not in tracked  # frozen objects are in no generation the collector walks
    made_after = Node()
    gone = weakref.ref(made_after)
    del made_after
    gc.collect()
    assert gone() is None  # garbage made after the start is still collected


def test_after_the_start_of_a_large_process_full_collections_still_come() -> None:
    # CPython waits for a quarter of what the last full collection left in the old generation; the freeze
    # must not leave that at the size of everything the start built.
    with collection_paused():
        engine_state = [[None] for _ in range(1_500_000)]
    assert full_collections_while_allocating(300_000) >= 2
    assert len(engine_state) == 1_500_000


def test_an_error_in_the_start_still_collects_and_turns_the_collector_back_on() -> None:
    before = last_collection()
    gone: list[weakref.ref[Node]] = []

    def failing_start() -> None:
        with collection_paused():
            built = [Node() for _ in range(ENGINE_START_OBJECTS)]
            gone.append(weakref.ref(built[0]))
            del built
            raise RuntimeError("no GPU")

    with pytest.raises(RuntimeError, match="no GPU"):
        failing_start()
    assert gc.isenabled()
    assert gone[0]() is None
    assert last_collection() is not before


def test_overlapping_starts_keep_the_collector_off_until_the_last_one_ends() -> None:
    first_in, second_done = threading.Event(), threading.Event()
    seen_in_first: list[bool] = []

    def first() -> None:
        with collection_paused():
            built = [Node() for _ in range(ENGINE_START_OBJECTS)]
            first_in.set()
            second_done.wait(5)
            seen_in_first.append(gc.isenabled())
            del built

    thread = threading.Thread(target=first)
    thread.start()
    assert first_in.wait(5)
    before = last_collection()
    with collection_paused():
        pass
    assert not gc.isenabled()  # the other start is still going
    assert last_collection() is before
    second_done.set()
    thread.join(5)
    assert seen_in_first == [False]
    assert gc.isenabled()
    assert last_collection() is not before


def test_a_start_that_builds_little_turns_the_collector_back_on_without_walking_the_heap() -> None:
    before = last_collection()
    with collection_paused():
        preview_engine = [Node() for _ in range(1_000)]
        assert not gc.isenabled()
    assert gc.isenabled()
    assert last_collection() is before  # no collection ran
    assert gc.get_freeze_count() == 0  # and nothing was frozen
    assert len(preview_engine) == 1_000


def test_a_library_collecting_inside_the_start_does_not_hide_what_the_start_built() -> None:
    # torch.compile collected the young generations after each frame it compiled, and each collection
    # resets the count of new objects: the start still built an engine's worth, and must end as one does.
    before = last_collection()
    with collection_paused():
        engine_state = []
        for _ in range(5):
            engine_state += [Node() for _ in range(ENGINE_START_OBJECTS // 5)]
            gc.collect(1)
        assert gc.get_count()[0] < MIN_OBJECTS_TO_COLLECT
    collection = last_collection()
    assert collection is not before
    assert collection is not None
    assert collection.frozen >= len(engine_state)
    assert gc.isenabled()


def test_collections_inside_a_small_start_do_not_make_it_a_large_one() -> None:
    before = last_collection()
    with collection_paused():
        preview_engine = [Node() for _ in range(1_000)]
        gc.collect(1)
        gc.collect(1)
    assert last_collection() is before
    assert gc.get_freeze_count() == 0
    assert len(preview_engine) == 1_000


def test_a_collector_turned_off_before_stays_off_and_nothing_is_frozen_for_it() -> None:
    gc.disable()
    before = last_collection()
    with collection_paused():
        pass
    assert not gc.isenabled()
    assert last_collection() is before
    assert gc.get_freeze_count() == 0


class StartRecordingEngine:
    """An engine whose start notes whether the collector ran during it."""

    name = "start-recording"
    model = "records the collector"
    max_batch = 1

    def __init__(self) -> None:
        self.collector_on_during_warm_up: bool | None = None
        self.compiled: list[Node] = []

    def warm_up(self) -> None:
        self.collector_on_during_warm_up = gc.isenabled()
        self.compiled = [Node() for _ in range(ENGINE_START_OBJECTS)]  # as a real engine's graphs

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        return [b"frame" for _ in jobs]


def test_the_worker_builds_and_warms_its_engine_with_the_collector_paused() -> None:
    built_with_collector_on: list[bool] = []
    engine = StartRecordingEngine()

    def factory() -> StartRecordingEngine:
        built_with_collector_on.append(gc.isenabled())
        return engine

    async def scenario() -> None:
        ready = asyncio.Event()
        scheduler = Scheduler(factory)
        scheduler.start(
            asyncio.get_running_loop(), SchedulerHooks(on_ready=lambda _: ready.set(), on_failed=print)
        )
        try:
            await asyncio.wait_for(ready.wait(), 5)
        finally:
            scheduler.stop()

    before = last_collection()
    asyncio.run(scenario())
    assert built_with_collector_on == [False]
    assert engine.collector_on_during_warm_up is False
    assert gc.isenabled()
    assert last_collection() is not before
