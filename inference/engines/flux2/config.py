"""The flux2 engine's settings, in one object the engine is built from.

The worker maps its own settings onto these names (``inference.engines.flux2_options``); the bench sets
the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import torch

from inference.adapters import AdapterSpec
from inference.engines.flux2.compiled import COMPILE_SCOPES
from inference.engines.flux2.recipes import DEFAULT_MODES, MODE_RECIPES, ModeRecipe, offered_modes

DEFAULT_MODEL: Final = "black-forest-labs/FLUX.2-klein-4B"
_DTYPES: Final = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class Flux2Config:
    """Everything a Flux2Engine is built from (besides, optionally, a pipeline already in memory)."""

    # Hugging Face repo id or local directory of a diffusers-format FLUX.2 [klein] checkpoint. Ignored
    # with `random_weights` or `tiny`.
    model: str = DEFAULT_MODEL
    # Where downloaded weights are stored (None: huggingface_hub's cache, HF_HOME); a persistent volume
    # spares a restarted worker the ~16 GB download.
    cache_dir: str | Path | None = None
    # Passed to huggingface_hub.snapshot_download.
    revision: str | None = None
    local_files_only: bool = False
    device: str | torch.device | None = None  # "cuda", "cuda:1", "cpu"; None: CUDA when available
    # "bfloat16", "float16", "float32" or a torch dtype; None: bfloat16 on CUDA, float32 on a CPU.
    dtype: str | torch.dtype | None = None
    steps: int = 2  # denoising steps of a job that asks for 0 or fewer (klein is distilled for 4)
    max_batch: int = 4  # jobs one render() call accepts
    # The real klein-4B architecture with random weights instead of a checkpoint: real size and speed,
    # meaningless pixels (benchmarks on machines without the weights).
    random_weights: bool = False
    # A tiny configuration with random weights (klein_config.TINY): the real pipeline code on a CPU (tests).
    tiny: bool = False
    weights_seed: int = 0  # seed of the random weights
    # Ids of the built-in modes offered (MODE_RECIPES), the first being the default: warm_up() prepares it,
    # and each other one is a deferred_warm_ups() task the scheduler runs while idle.
    modes: Sequence[str] = DEFAULT_MODES
    # Repo id or local path of the decoders a mode's recipe may name (decoders.py), fetched into cache_dir
    # once a mode uses one. None: the published repo (decoders.SMALL_DECODER_REPO, TINY_DECODER_REPO), or
    # with `random_weights` or `tiny` the decoder's architecture with random weights.
    small_decoder: str | None = None
    tiny_decoder: str | None = None
    # More modes, offered after those, as {id: recipe} (the bench measures one approximation at a time so).
    custom_modes: Mapping[str, ModeRecipe] = field(default_factory=dict)
    # torch.compile the transformer and the VAE's encoder and decoder (compiled.py); None: on CUDA, not on
    # a CPU. Compiled kernels round differently from eager ones, so outputs move by rounding-level amounts,
    # as a compiled Flux2KleinPipeline's do; the math stays the pipeline's.
    compile: bool | None = None
    compile_scope: str = "blocks"  # one of compiled.COMPILE_SCOPES
    # Modes whose transformer is compiled as one graph besides its blocks (compiled.whole_graph): a faster
    # frame for a longer first compilation, worth it for the fastest mode (docs/performance.md, "Levers").
    # Ids of modes not offered are ignored, so the default holds whether or not flash is offered.
    whole_graph_modes: Sequence[str] = ("flash",)
    # Replay each frame's GPU work as one captured CUDA graph (cuda_graphs.py); None: when compiled on CUDA.
    cuda_graphs: bool | None = None
    # Fuse the exact transformer's q/k/v projections (the FP8 copy's always are).
    fuse_qkv: bool = False
    # LoRA adapters loaded at start (inference.adapters, FLUX2_LORAS), each a session may choose per frame.
    loras: Sequence[AdapterSpec] = ()
    prompt_cache_size: int = 32  # prompts whose embeddings are kept (about 8 MB each at klein-4B in bf16)
    jpeg_quality: int = 90  # of the output JPEGs

    def __post_init__(self) -> None:
        offered_modes(self.modes, self.custom_modes)  # raises for unknown, duplicate or no modes
        unknown = [m for m in self.whole_graph_modes if m not in MODE_RECIPES and m not in self.custom_modes]
        if unknown:
            raise ValueError(f"whole_graph_modes names unknown modes {unknown}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {self.compile_scope!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if isinstance(self.dtype, str) and self.dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        return _DTYPES[self.dtype.removeprefix("torch.")]

    @property
    def model_label(self) -> str:
        """What produces the pixels, as the user is told."""
        if self.tiny:
            return "FLUX.2 [klein] tiny test configuration (random weights)"
        if self.random_weights:
            return "FLUX.2 [klein] 4B architecture (random weights)"
        return "FLUX.2 [klein] 4B"
