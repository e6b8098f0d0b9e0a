"""The one interface every engine implements: render a batch of frame jobs.

Engines own decoding and encoding so a GPU engine can keep frames as tensors end to end (nvJPEG, no PIL
in the hot path) while the CPU preview engine uses Pillow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

OUTPUT_SIZE = 512


@dataclass(frozen=True, slots=True)
class FrameJob:
    """One input frame of one session, with that session's settings at the time it was taken."""

    session_id: str
    frame_id: int
    jpeg: bytes  # validated JPEG, any size; the engine center-crops and resizes to OUTPUT_SIZE²
    prompt: str
    steps: int
    seed: int


@runtime_checkable
class Engine(Protocol):
    name: str  # "preview", "flux2"
    model: str  # what produced the pixels, shown to the user ("FLUX.2 [klein] 4B", "preview filters")
    max_batch: int  # how many jobs one render() call accepts

    def warm_up(self) -> None:
        """Load weights and run one throw-away render so the first real frame is not slow. Blocking."""
        ...

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        """Render every job; returns one OUTPUT_SIZE² JPEG per job, in order. Blocking; thread-safe
        only in the sense that the scheduler never calls it concurrently."""
        ...
