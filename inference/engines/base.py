"""The one interface every engine implements: render a batch of frame jobs.

Engines own decoding and encoding so a GPU engine can keep frames as tensors end to end (nvJPEG, no PIL
in the hot path) while the CPU preview engine uses Pillow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from inference.protocol import AdapterInfo, RenderMode
from inference.style_image import StyleImage


@dataclass(frozen=True, slots=True)
class FrameJob:
    """One input frame of one session, with that session's settings at the time it was taken."""

    session_id: str
    frame_id: int
    jpeg: bytes  # validated JPEG, any size; the engine center-crops and resizes to OUTPUT_SIZE²
    prompt: str
    steps: int
    seed: int
    mode: str = ""  # a RenderMode id of the engine; "" means the engine's default (its first mode)
    # The session's style image, the same object for all its jobs until the session changes it; None: the
    # prompt alone. Engines key what they derive from it (latents) by this object.
    style: StyleImage | None = None
    # The session's LoRA adapter (a name of the engine's `adapters`; None: none) and its scale (None: the
    # adapter's default). Jobs with different adapters share one batch.
    adapter: str | None = None
    adapter_scale: float | None = None


@runtime_checkable
class Engine(Protocol):
    name: str  # "preview", "flux2"
    model: str  # what produced the pixels, shown to the user ("FLUX.2 [klein] 4B", "preview filters")
    max_batch: int  # how many jobs one render() call accepts
    modes: tuple[RenderMode, ...]  # what a session may choose; the first is the default

    def warm_up(self) -> None:
        """Load weights and run one throw-away render so the first real frame is not slow. Blocking."""
        ...

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        """Render every job; returns one OUTPUT_SIZE² JPEG per job, in order. Blocking; thread-safe
        only in the sense that the scheduler never calls it concurrently. A job whose ``mode`` is not one
        of ``modes`` raises ValueError (sessions validate modes before submitting)."""
        ...


def deferred_warm_ups(engine: Engine) -> list[Callable[[], None]]:
    """Warm-up work an engine left out of ``warm_up()`` so its first frame comes sooner (e.g. compiling
    the modes other than the default), as blocking tasks to run in the render thread while it is idle.
    Optional: an engine without a ``deferred_warm_ups()`` method has none."""
    method = getattr(engine, "deferred_warm_ups", None)
    return list(method()) if method is not None else []


def mode_ids(engine: Engine) -> frozenset[str]:
    return frozenset(mode.id for mode in engine.modes)


def served_adapters(engine: Engine) -> tuple[AdapterInfo, ...]:
    """The LoRA adapters a session may choose. Optional: an engine without an ``adapters`` attribute (the
    preview engine) serves none."""
    return tuple(getattr(engine, "adapters", ()))
