"""The app's collector policy: full collections stay short however much lives long, and nothing that dies
is kept for longer than a sweep."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from app.collector import CollectorPolicy
from tests.collections_probe import Node, full_collections_while_allocating


@pytest.fixture
def policy() -> Iterator[CollectorPolicy]:
    policy = CollectorPolicy()
    policy.install(background=False)
    try:
        yield policy
    finally:
        policy.uninstall()


def _full_collection_ms() -> float:
    # The collecting thread's CPU time: what the collection costs, not how long the machine made it wait.
    started = time.thread_time()
    gc.collect()
    return (time.thread_time() - started) * 1000


def test_a_full_collection_no_longer_scans_what_lives_long() -> None:
    long_lived = [{"connection": [index], "account": {"id": str(index)}} for index in range(200_000)]
    gc.collect()
    without = min(_full_collection_ms() for _ in range(3))
    policy = CollectorPolicy()
    policy.install(background=False)
    try:
        gc.collect()  # the survivors are frozen
        with_policy = min(_full_collection_ms() for _ in range(3))
    finally:
        policy.uninstall()
    assert len(long_lived) == 200_000
    assert with_policy < without / 4, (with_policy, without)


def test_garbage_made_after_a_full_collection_is_still_collected(policy: CollectorPolicy) -> None:
    gc.collect()
    node = Node()
    gone = weakref.ref(node)
    del node
    gc.collect()
    assert gone() is None


def test_a_cycle_that_dies_while_frozen_is_freed_by_the_next_sweep(policy: CollectorPolicy) -> None:
    node = Node()
    gone = weakref.ref(node)
    gc.collect()  # alive: frozen with the other survivors
    del node
    gc.collect()
    assert gone() is not None  # frozen objects wait for a sweep
    assert policy.sweep() > 0
    assert gone() is None


def test_sweeps_run_in_the_background_until_uninstalled() -> None:
    policy = CollectorPolicy(sweep_seconds=0.05)
    policy.install()
    try:
        node = Node()
        gone = weakref.ref(node)
        gc.collect()
        del node
        deadline = time.monotonic() + 10
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone() is None
    finally:
        policy.uninstall()
    sweeps = policy.sweeps
    time.sleep(0.2)
    assert policy.sweeps == sweeps
    assert gc.get_freeze_count() == 0


def _full_collections_with_the_policy(count: int) -> tuple[int, int]:
    """Full collections while allocating `count` cyclic objects right after the policy is installed, then
    right after a sweep; the policy is uninstalled after."""
    policy = CollectorPolicy()
    policy.install(background=False)
    try:
        after_install = full_collections_while_allocating(count)
        policy.sweep()
        return after_install, full_collections_while_allocating(count)
    finally:
        policy.uninstall()


def test_full_collections_come_in_smaller_batches_and_the_default_returns_after() -> None:
    before = gc.get_threshold()
    gc.collect()
    without = full_collections_while_allocating(300_000)
    with_policy, _ = _full_collections_with_the_policy(300_000)
    assert with_policy >= 2 * max(without, 1), (with_policy, without)
    assert gc.get_threshold() == before


def test_a_process_holding_millions_of_objects_gets_the_smaller_batches_from_the_start() -> None:
    # CPython waits for a quarter of what the last full collection left in the old generation before it
    # runs another; a freeze of the whole heap must not leave that count at the heap's size.
    long_lived = [[None] for _ in range(1_500_000)]
    gc.collect()
    without = full_collections_while_allocating(300_000)
    after_install, after_sweep = _full_collections_with_the_policy(300_000)
    assert len(long_lived) == 1_500_000
    assert after_install >= 2 * max(without, 1), (after_install, without)
    assert after_sweep >= 2 * max(without, 1), (after_sweep, without)
