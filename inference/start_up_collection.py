"""Python's cyclic garbage collector while an engine starts: paused, then one collection and a freeze.

An engine's start is pure CPU work on one thread: importing torch, transformers and diffusers, then
dynamo tracing every compiled graph. Both build hundreds of thousands of long-lived objects (modules,
graphs, guards, compiled code), and the collector keeps walking them: on a 2-core CPU its collections
took 1.0-1.1 s of a 7.8 s import and 0.5 s of the tiny engine's warm-up, where almost nothing it visits
is garbage (docs/performance.md, "Cold start"). Paused instead, the start ends with a single collection
(0.5 s there, freeing the ~23,000 objects that did die), and what survived it is frozen (``gc.freeze``):
it lives as long as the process, so later collections, during streaming, no longer walk it.

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

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StartUpCollection:
    """The collection that ended a pause."""

    seconds: float
    freed: int  # objects the collection found unreachable
    frozen: int  # objects frozen after it (everything still alive in the process)


_lock = threading.Lock()
_depth = 0
_resume = False  # whether the collector was on when the outermost pause began
_last: StartUpCollection | None = None


@contextmanager
def collection_paused() -> Iterator[None]:
    """The collector off for the block; when the outermost pause ends (exception or not), one full
    collection, the survivors frozen and the collector on again, unless it was off before."""
    global _depth, _resume, _last
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                started = time.perf_counter()
                freed = gc.collect()
                gc.freeze()
                gc.enable()
                _last = StartUpCollection(time.perf_counter() - started, freed, gc.get_freeze_count())
                log.debug(
                    "start-up collection freed %d objects in %.0f ms; %d frozen",
                    _last.freed,
                    _last.seconds * 1000,
                    _last.frozen,
                )


def last_collection() -> StartUpCollection | None:
    """The collection that ended this process's latest pause; None before any pause has ended."""
    return _last


__all__ = ["StartUpCollection", "collection_paused", "last_collection"]
