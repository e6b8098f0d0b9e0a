"""What the tests of the garbage collector's policies measure: full collections while garbage is made."""

from __future__ import annotations

import gc
from collections import deque


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def full_collections_while_allocating(count: int) -> int:
    """How many full collections ran while `count` cyclic objects were made, each dying 20,000 objects
    later: after a few young collections, as the Clerk SDK's per-call model classes do while their request
    awaits Clerk, so they reach the old generation as garbage."""
    full = 0

    def seen(phase: str, info: dict[str, object]) -> None:
        nonlocal full
        if phase == "stop" and info["generation"] == 2:
            full += 1

    window: deque[Node] = deque(maxlen=20_000)
    gc.callbacks.append(seen)
    try:
        for _ in range(count):
            window.append(Node())
    finally:
        gc.callbacks.remove(seen)
    return full
