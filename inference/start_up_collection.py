"""Python's cyclic garbage collector while an engine starts: paused, then one collection and a freeze.

An engine's start is pure CPU work on one thread: importing torch, transformers and diffusers, then
dynamo tracing every compiled graph. Both build hundreds of thousands of long-lived objects (modules,
graphs, guards, compiled code), and the collector keeps walking them: on a 2-core CPU its collections
took 1.0-1.1 s of a 7.8 s import and 0.5 s of the tiny engine's warm-up, where almost nothing it visits
is garbage (docs/performance.md, "Cold start"). Paused instead, the start ends with a single collection
(0.5 s there, freeing the ~23,000 objects that did die), and what survived it is frozen (``gc.freeze``):
it lives as long as the process, so later collections, during streaming, no longer walk it.
``collect_and_freeze`` is that collection and freeze, shared with the web app's collector policy. A
start that built little (the preview engine's) skips the collection: in a process that already holds
much, walking it would cost more than the collections the pause skipped. What a start built is counted
across any collection a library runs inside the pause (each resets the young generation's count).

The pause is process-wide, as the collector is: nested or concurrent pauses (several replicas starting
in one process) keep it off until the last one ends. A collector someone else turned off stays off, and
nothing is collected or frozen for it."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StartUpCollection:
    """The collection that ended a pause."""

    seconds: float
    freed: int  # objects the collection found unreachable
    frozen: int  # objects frozen after it (everything still alive in the process)


# A start that built fewer objects than this ends without a collection: walking the process's heap
# would cost more than the few collections it skipped (the preview engine's start builds ~45,000; the
# flux2 engine's imports alone ~730,000).
MIN_OBJECTS_TO_COLLECT: Final = 200_000

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the collector was on when the outermost pause began
# What the outermost pause has built so far, but for the young generation's count now: less that count at
# its start, plus the counts that collections inside it reset (a library's gc.collect()).
_built_before_now = 0
_last: StartUpCollection | None = None


def _young_count_before_a_collection(phase: str, info: dict[str, int]) -> None:
    global _built_before_now
    if phase == "start":
        _built_before_now += gc.get_count()[0]


@contextmanager
def collection_paused() -> Iterator[None]:
    """The collector off for the block; when the outermost pause ends (exception or not), the collector
    on again, unless it was off before, after one full collection and a freeze of the survivors if the
    block built at least ``MIN_OBJECTS_TO_COLLECT`` objects."""
    global _depth, _resume, _built_before_now, _last
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
            _built_before_now = -gc.get_count()[0]
            gc.callbacks.append(_young_count_before_a_collection)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.callbacks.remove(_young_count_before_a_collection)
                if _resume:
                    if _built_before_now + gc.get_count()[0] >= MIN_OBJECTS_TO_COLLECT:
                        _last = _start_up_collection()
                    gc.enable()


def collects_at_its_end() -> bool:
    """Whether a pause is on that turns the collector back on at its end (it was on when the pause
    began): garbage made meanwhile is freed then, by the pause's collection or by the collector's next
    ones, so nothing needs to collect it sooner."""
    with _lock:
        return _depth > 0 and _resume


def _start_up_collection() -> StartUpCollection:
    started = time.perf_counter()
    freed = collect_and_freeze()
    collection = StartUpCollection(time.perf_counter() - started, freed, gc.get_freeze_count())
    log.debug(
        "start-up collection freed %d objects in %.0f ms; %d frozen",
        collection.freed,
        collection.seconds * 1000,
        collection.frozen,
    )
    return collection


def collect_and_freeze() -> int:
    """A full collection, its survivors frozen, then a second, near-empty one; what the first freed.

    CPython runs a full collection only once the objects that reached the old generation since the last
    one exceed a quarter of what that one left there, and freezing does not reset that count: right after
    a freeze of the whole heap, the next full collection would wait for a quarter of the heap (a process of
    2 million objects saw none while allocating 300,000). The second collection scans an old generation
    that is empty but for what it promotes, and makes that its count."""
    freed = gc.collect()
    gc.freeze()
    gc.collect()
    return freed


def last_collection() -> StartUpCollection | None:
    """The collection that ended this process's latest pause; None before any pause has ended."""
    return _last


__all__ = [
    "MIN_OBJECTS_TO_COLLECT",
    "StartUpCollection",
    "collect_and_freeze",
    "collection_paused",
    "collects_at_its_end",
    "last_collection",
]
