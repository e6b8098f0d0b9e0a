"""torch.compile scopes of the engine's modules: the transformer(s) and the VAE's encoder and decoder.

Compilation itself happens in the first call of each input shape (the engine's warm-up makes those calls).
Compiled kernels round differently from eager ones, so outputs move by rounding-level amounts, as those of
a compiled Flux2KleinPipeline do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import torch
from diffusers import AutoencoderKLFlux2
from diffusers.models.attention_processor import AttnProcessor

from inference.engines.flux2.group_norm import use_split_group_norm
from inference.start_up_collection import collects_at_its_end

# "blocks": regional compilation (diffusers' compile_repeated_blocks): the double and the single block are
# each compiled once and reused by every block of their kind. A warm start traces two blocks instead of 25:
# the exact mode's warm-up from a warm cache takes 8-10 s instead of 15, and its frame is as fast (a frame is
# replayed as one CUDA graph, so the blocks' boundaries cost no launches): docs/performance.md, "Cold start".
# "full": each transformer as one graph, for measuring what fusion across block boundaries would buy.
COMPILE_SCOPES: Final = ("blocks", "full")
# torch.compile's backend name, or a backend callable (tests count graphs with one that runs them eagerly).
Backend = str | Callable[..., Any]


def compile_keys() -> list[Callable[[], object]]:
    """The cached functions that compute the keys inductor's caches are looked up by: Triton's hash of its
    sources and compiler library (behind inductor's own cache of it on a torch that has one) and torch's
    hash of its sources. Importing them imports Triton."""
    from torch._inductor import codecache
    from torch._inductor.runtime import triton_compat

    triton_key = getattr(codecache, "triton_key", None)
    if triton_key is None and triton_compat.HAS_TRITON:
        triton_key = triton_compat.triton_key  # Triton's own, cached by Triton
    return [key for key in (triton_key, codecache.torch_key) if key is not None]


def prefetch_compile_keys(*, wait: bool = False) -> threading.Thread | None:
    """Compute the keys of ``compile_keys()`` before the first compilation needs them (0.6-0.7 s of Triton's
    hashing alone in a warm start on the GPU machines, in the middle of the warm-up). The hashing releases
    the GIL, so on a thread of its own it runs beside the loading and dynamo's tracing. The modules are
    imported here, on the calling thread (the warm-up imports them anyway): two threads importing the same
    circle of modules can deadlock. A torch whose key caches can prefetch does it itself, once; on one whose
    caches cannot, a compilation that asks before the thread is done computes its key as it would have, so
    nothing waits for the thread. ``wait``: compute them now, on this thread (before a memory snapshot,
    which then holds them). The thread, or None."""
    keys = compile_keys()
    if wait:
        for key in keys:
            key()
        return None
    if all(hasattr(key, "prefetch") for key in keys):
        for key in keys:
            key.prefetch()  # type: ignore[attr-defined]
        return None
    thread = threading.Thread(target=lambda: [key() for key in keys], name="compile-keys", daemon=True)
    thread.start()
    return thread


@contextmanager
def compile_collections_left_to_the_pause() -> Iterator[None]:
    """Inside a start-up pause of the collector (inference/start_up_collection.py) that ends with a
    collection, dynamo does not collect after each frame it compiles. Its ``run_gc_after_compile`` frees a
    compilation's reference cycles at once, a young-generation collection per frame: 0.46-0.66 s of a warm
    start on the H200 machine, and the pause's own collection at its end frees the same garbage. Elsewhere,
    or on a torch without the setting, nothing changes."""
    config = torch._dynamo.config
    if not collects_at_its_end() or not getattr(config, "run_gc_after_compile", False):
        yield
        return
    with config.patch(run_gc_after_compile=False):
        yield


def compile_transformers(
    exact: torch.nn.Module, fp8: torch.nn.Module | None, *, scope: str, backend: Backend = "inductor"
) -> None:
    """Compile the exact transformer and the FP8 copy (when there is one) in place; compiling a module
    again replaces its compilation."""
    # Both transformers' blocks share one code object per block class, and every mode and batch shape is
    # a graph of its own under it: more than dynamo's default limit of 8, past which it gives up.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 1024
    )
    for module in [exact] if fp8 is None else [exact, fp8]:
        # dynamic=None: batch size 1 gets a graph of its own, the first other batch size a graph with a
        # symbolic batch dimension that serves every larger batch (no compilation per session count).
        if scope == "blocks":
            module.compile_repeated_blocks(fullgraph=True, dynamic=None, backend=backend)
        else:
            module.compile(fullgraph=True, dynamic=None, backend=backend)


def whole_graph(module: torch.nn.Module, *, backend: Backend = "inductor") -> torch.nn.Module:
    """``module`` compiled as one graph, beside its own compilation by blocks: calling the result traces the
    blocks inline (inductor then fuses each block's residual and gating with the next block's norm and FP8
    scaling), while calling ``module`` still runs its compiled blocks. The weights are ``module``'s.

    Fusion across the block boundaries makes a flash frame 0.6-0.8 ms faster; tracing 25 blocks instead of
    two makes its compilation longer (docs/performance.md, "Levers")."""
    return torch.compile(module, fullgraph=True, dynamic=None, backend=backend)


def compile_vae(vae: AutoencoderKLFlux2) -> None:
    """Compile the VAE's encoder and decoder in place, with the layout, normalisation and attention they
    compile best in.

    The VAE runs once per frame each way. Shapes are static: a dynamic graph would serve the 256² reference
    frames of "turbo" too, but it is then also what the 512² frames run through (dynamo tries its newest
    graph first), and its kernels are slower. The weights are made channels-last, the layout the tensor-core
    convolutions read, so no layout copies sit between them; GroupNorm reduces its statistics in two parallel
    stages (group_norm.py: at batch 1 a group is one long reduction); and the mid-block attention (one head
    of 512 channels, which the flash kernels do not take) becomes plain matrix products that inductor fuses.
    docs/performance.md has what each of these buys.
    """
    vae.to(memory_format=torch.channels_last)
    use_split_group_norm(vae)
    vae.set_attn_processor(AttnProcessor())
    vae.encoder.compile(fullgraph=True, dynamic=False)
    vae.decoder.compile(fullgraph=True, dynamic=False)
