"""The garbage collector, tuned for the app's latency budget (docs/performance.md, "1,000 streams").

CPython 3.11 and 3.12 collect the oldest generation in one stop-the-world pass over every object in it,
and every request in flight waits for it. Two things make those passes long and frequent in this app:

* what lives long: open connections (one per studio tab, kept alive between meter polls), cached
  accounts, per-user write queues; at 1,000 streams about 140,000 objects;
* what dies young but not young enough: the Clerk SDK builds a pydantic model class for each request and
  each answer (cyclic garbage that only the collector reclaims), and requests awaiting Clerk outlive
  several young collections, so their objects reach the oldest generation before they die.

Measured at 1,000 streams, full collections came about once a second and took 64 to 250 ms each: the tail
of every endpoint. The policy here:

* at start-up everything built so far is frozen (`gc.freeze`, through `collect_and_freeze`, which also
  resets CPython's count of the old generation): it lives as long as the process;
* after every full collection its survivors are frozen too. They were just found reachable, so no
  garbage is frozen, and the next full collection scans only what reached the old generation since
  (the SDK's garbage among it), a few milliseconds instead of a pass over every connection;
* a full collection runs after every `OLD_GENERATION_THRESHOLD` (2) collections of the middle generation
  instead of CPython's 10. With the long-lived objects frozen, what a full collection costs is mostly
  freeing the SDK's garbage, and freeing it in smaller batches makes every pause shorter
  (docs/performance.md, "1,000 streams on one process");
* every `sweep_seconds` the frozen objects are collected once (`gc.unfreeze` and a full collection):
  objects frozen while alive whose cycles have since died (closed connections) are reclaimed then. One
  long pause every ten minutes instead of one a second.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from inference.start_up_collection import collect_and_freeze

log = logging.getLogger(__name__)

DEFAULT_SWEEP_SECONDS = 600.0
# Collections of the middle generation between two full collections (CPython's default is 10).
OLD_GENERATION_THRESHOLD = 2


class CollectorPolicy:
    def __init__(self, *, sweep_seconds: float = DEFAULT_SWEEP_SECONDS) -> None:
        self.sweep_seconds = sweep_seconds
        self._sweeping = False
        self._installed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thresholds: tuple[int, int, int] | None = None
        self.sweeps = 0

    def install(self, *, background: bool = True) -> None:
        """Freeze what exists now and freeze every full collection's survivors from now on; with
        `background`, a daemon thread sweeps every `sweep_seconds`."""
        if self._installed:
            return
        young, middle, _ = self._thresholds = gc.get_threshold()
        gc.set_threshold(young, middle, OLD_GENERATION_THRESHOLD)
        collect_and_freeze()
        gc.callbacks.append(self._after_collection)
        self._installed = True
        if background:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sweep_periodically, name="gc-sweep", daemon=True)
            self._thread.start()

    def uninstall(self) -> None:
        """Stop freezing and sweeping; what is frozen goes back to the collector's generations."""
        if not self._installed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        gc.callbacks.remove(self._after_collection)
        self._installed = False
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    def sweep(self) -> int:
        """Collect everything once, frozen objects included, then freeze the survivors; what it freed."""
        self._sweeping = True
        started = time.perf_counter()
        try:
            gc.unfreeze()
            freed = collect_and_freeze()
        finally:
            self._sweeping = False
        self.sweeps += 1
        log.debug("gc sweep freed %d objects in %.0f ms", freed, (time.perf_counter() - started) * 1000)
        return freed

    def _after_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2 and not self._sweeping:
            gc.freeze()

    def _sweep_periodically(self) -> None:
        while not self._stop.wait(self.sweep_seconds):
            self.sweep()


__all__ = ["DEFAULT_SWEEP_SECONDS", "OLD_GENERATION_THRESHOLD", "CollectorPolicy"]
