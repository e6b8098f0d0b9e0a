"""A frame's GPU work replayed as one captured CUDA graph instead of launched kernel by kernel.

A frame is ~2,000 kernels, many of them short (FP8 products, norms); launched one by one from Python they
leave the GPU idle between them, replayed from a graph they do not. The captured kernels are the compiled
ones, and outputs match the launched ones to rounding: some library kernels are chosen differently inside
a capture (docs/performance.md, "Replayed vs launched outputs").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

Denoise = Callable[..., torch.Tensor]


def batch_rows(rows: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The rows' cached tensors as one batch along ``dim``; a single row is the cached tensor itself, not a
    copy, so a captured graph whose input buffer already holds it does not copy it again (``_holds``)."""
    return rows[0] if len(rows) == 1 else torch.cat(list(rows), dim=dim)


class FrameGraph:
    """One captured call of ``denoise``. Replaying it runs every kernel of the call with a single launch,
    reading the inputs from buffers of its own and writing the output to a buffer of its own."""

    def __init__(self, denoise: Denoise, inputs: tuple[torch.Tensor, ...], *, pool: Any) -> None:
        device = inputs[0].device
        self.inputs = tuple(tensor.clone() for tensor in inputs)
        # Per input, the tensor last copied into its buffer and its version counter then; kept alive so
        # that its memory cannot be handed to another tensor meanwhile.
        self._copied: list[tuple[torch.Tensor, int] | None] = [None] * len(inputs)
        # Uncaptured calls first, on a side stream as capture requires: they compile what is not compiled
        # yet, fill the engine's caches (ids, schedules: host-to-device copies cannot be captured) and let
        # libraries allocate their workspaces.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                denoise(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's other threads may touch CUDA meanwhile (memory metrics) without
        # invalidating the capture; frames are only ever rendered by one thread.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = denoise(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        # What a buffer already holds is not copied again: a session's cached prompt embedding, noise and
        # style image keys and values (~300 MB) are copied when they change, not with every frame.
        for index, (buffer, tensor) in enumerate(zip(self.inputs, inputs, strict=True)):
            if not _holds(self._copied[index], tensor):
                buffer.copy_(tensor)
                self._copied[index] = (tensor, tensor._version)
        self.graph.replay()
        # A copy: the next replay overwrites the output buffer.
        return self.output.clone()


def _holds(copied: tuple[torch.Tensor, int] | None, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has the values of the tensor copied before: the same memory viewed alike (views
    of one cached tensor are new objects each time), not written since (views share a version counter)."""
    if copied is None:
        return False
    previous, version = copied
    return (
        tensor.data_ptr() == previous.data_ptr()
        and tensor.shape == previous.shape
        and tensor.stride() == previous.stride()
        and tensor.dtype == previous.dtype
        and tensor._version == version
    )


class FrameGraphs:
    """The captured graphs of one engine, one per (mode, steps, batch size), captured on first use and
    never freed; all share one memory pool."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[str, int, int], FrameGraph] = {}
        self._pool: Any = None

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        return key in self._graphs

    def replay(
        self, key: tuple[str, int, int], denoise: Denoise, inputs: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """``denoise(*inputs)`` replayed from the graph of ``key`` (captured from ``denoise`` first if it
        has none yet)."""
        graph = self._graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            logger.info("capturing the CUDA graph of mode %s, %d steps, batch %d", *key)
            graph = FrameGraph(denoise, inputs, pool=self._pool)
            self._graphs[key] = graph
        return graph(*inputs)
