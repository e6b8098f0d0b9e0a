"""Dynamo's collection after each compiled frame, left to the start-up pause's collection."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from inference.engines.flux2.compiled import compile_collections_left_to_the_pause
from inference.start_up_collection import collection_paused


@contextmanager
def _young_collections() -> Iterator[list[int]]:
    """The generations of the collections that start inside the block, in order."""
    generations: list[int] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield generations
    finally:
        gc.callbacks.remove(note)


_compiled = itertools.count()


def _compile_a_new_function() -> None:
    # Dynamo caches compilations by code object, so each call compiles source of its own.
    name = f"double_then_add_{next(_compiled)}"
    namespace: dict = {}
    exec(compile(f"def {name}(x):\n    return x * 2 + 1\n", name, "exec"), namespace)
    compiled = torch.compile(namespace[name], backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))


def test_inside_the_pause_dynamo_compiles_without_collecting() -> None:
    with collection_paused(), compile_collections_left_to_the_pause(), _young_collections() as generations:
        _compile_a_new_function()
    assert 1 not in generations
    assert torch._dynamo.config.run_gc_after_compile  # the setting is back once the block ends


def test_outside_a_pause_dynamo_still_collects_after_compiling() -> None:
    with compile_collections_left_to_the_pause(), _young_collections() as generations:
        _compile_a_new_function()
    assert 1 in generations


def test_a_collector_someone_else_turned_off_keeps_dynamos_collections() -> None:
    # The pause then ends without a collection, so dynamo's are the ones that free a compilation's cycles.
    gc.disable()
    try:
        with (
            collection_paused(),
            compile_collections_left_to_the_pause(),
            _young_collections() as generations,
        ):
            _compile_a_new_function()
    finally:
        gc.enable()
    assert 1 in generations
