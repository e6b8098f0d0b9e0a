"""Render modes as recipes: which approximations of the exact pipeline each mode applies.

A session picks a mode per frame (``FrameJob.mode``). The default recipe is the exact pipeline; every
other one is labelled approximate and says what it changes. Each approximation lives in its own module:
``fp8.py`` (FP8 matrix products), ``kv_reuse.py`` (the reference frame's keys and values computed once per
frame); fewer text tokens and a smaller reference frame are shapes the render path takes from the recipe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from inference.engines.flux2.decoders import DECODERS
from inference.engines.flux2.klein_config import MAX_SEQUENCE_LENGTH
from inference.protocol import OUTPUT_SIZE, STYLE_IMAGE_SIZE, RenderMode


@dataclass(frozen=True, slots=True)
class ModeRecipe:
    """Which approximations a render mode applies; the default recipe is the exact pipeline."""

    # The transformer blocks' linear layers multiply in FP8 (e4m3) on the tensor cores: weights quantized
    # once with one scale per output channel, activations per token on the fly, fast (reduced-precision)
    # accumulation.
    fp8: bool = False
    # How many prompt-embedding tokens the transformer attends to. The pipeline pads every prompt to 512
    # and attends to the padding too; the text encoder is causal, so the first `text_tokens` embeddings are
    # unchanged by dropping the rest, but the transformer's output changes (and longer prompts are cut).
    text_tokens: int = MAX_SEQUENCE_LENGTH
    # Flux2KleinKVPipeline's scheme: at the first step the reference tokens attend only to themselves, at
    # timestep 0, and their keys/values are cached; later steps run without them and attend to the cache.
    reference_kv_reuse: bool = False
    # Under reference K/V reuse, a style image's keys and values computed once per style image instead of
    # with each frame's: each reference image's tokens attend only to their own image (kv_reuse.py), so the
    # style image's do not change from frame to frame.
    style_kv_once: bool = False
    # Side of the square the webcam frame is encoded at as the reference image (512: 1024 tokens).
    reference_size: int = OUTPUT_SIZE
    # Side of the square a session's style image is encoded at as the second reference image.
    style_size: int = STYLE_IMAGE_SIZE
    # What turns the denoised latents into pixels (decoders.py): "full" (the model's own VAE decoder),
    # "small" (FLUX.2-small-decoder) or "tiny" (TAEF2). The frame is always encoded by the model's encoder.
    decoder: str = "full"

    def __post_init__(self) -> None:
        if not 1 <= self.text_tokens <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"text_tokens must be in 1..{MAX_SEQUENCE_LENGTH}, got {self.text_tokens}")
        if self.reference_size % 16 or not 64 <= self.reference_size <= OUTPUT_SIZE:
            raise ValueError(f"reference_size must be a multiple of 16 in 64..{OUTPUT_SIZE}")
        if self.style_size % 16 or not 64 <= self.style_size <= STYLE_IMAGE_SIZE:
            raise ValueError(f"style_size must be a multiple of 16 in 64..{STYLE_IMAGE_SIZE}")
        if self.style_kv_once and not self.reference_kv_reuse:
            raise ValueError("style_kv_once needs reference_kv_reuse")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")

    @property
    def approximate(self) -> bool:
        return self != ModeRecipe()

    def describe(self) -> str:
        """The approximations, e.g. "fp8, 128 text tokens, reference K/V reuse"; "exact" when none."""
        parts = ["fp8"] if self.fp8 else []
        if self.text_tokens != MAX_SEQUENCE_LENGTH:
            parts.append(f"{self.text_tokens} text tokens")
        if self.reference_kv_reuse:
            parts.append("reference K/V reuse")
        if self.style_kv_once:
            parts.append("style image K/V once per image")
        if self.reference_size != OUTPUT_SIZE:
            parts.append(f"reference {self.reference_size}x{self.reference_size}")
        if self.style_size != STYLE_IMAGE_SIZE:
            parts.append(f"style image {self.style_size}x{self.style_size}")
        if self.decoder != "full":
            parts.append(f"{self.decoder} decoder")
        return ", ".join(parts) or "exact"


EXACT: Final = RenderMode(
    id="exact",
    label="Exact",
    approximate=False,
    detail="FLUX.2 [klein] computed as the reference pipeline computes it (bf16, full prompt and frame).",
)
FAST: Final = RenderMode(
    id="fast",
    label="Fast",
    approximate=True,
    detail="Approximate: FP8 matrix products, a 128-token prompt, the webcam frame's attention keys and "
    "values computed once per frame instead of at every step, and a style image's once per image.",
)
TURBO: Final = RenderMode(
    id="turbo",
    label="Turbo",
    approximate=True,
    detail="Approximate: as Fast, with the webcam frame read at 256x256 instead of 512x512 "
    "(the output stays 512x512).",
)
FLASH: Final = RenderMode(
    id="flash",
    label="Flash",
    approximate=True,
    detail="Approximate: as Turbo, with the output decoded by a tiny decoder (TAEF2) instead of the "
    "model's own, which softens fine detail.",
)
_FAST: Final = ModeRecipe(fp8=True, text_tokens=128, reference_kv_reuse=True, style_kv_once=True)
# The built-in modes, fastest last; the worker's FLUX2_MODES picks from these ids.
MODE_RECIPES: Final[dict[str, tuple[RenderMode, ModeRecipe]]] = {
    "exact": (EXACT, ModeRecipe()),
    "fast": (FAST, _FAST),
    "turbo": (TURBO, replace(_FAST, reference_size=256)),
    "flash": (FLASH, replace(_FAST, reference_size=256, decoder="tiny")),
}
# What an engine offers unless told otherwise: flash needs the tiny decoder's weights besides the model's.
DEFAULT_MODES: Final = ("exact", "fast", "turbo")


def offered_modes(
    modes: Sequence[str], custom_modes: Mapping[str, ModeRecipe]
) -> dict[str, tuple[RenderMode, ModeRecipe]]:
    """The modes an engine offers by id, in order (the first is the default): the built-in ``modes``, then
    the ``custom_modes``, each labelled with its id and described by its recipe."""
    unknown = [mode for mode in modes if mode not in MODE_RECIPES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; built-in modes are {', '.join(MODE_RECIPES)}")
    offered = {mode: MODE_RECIPES[mode] for mode in modes}
    for mode_id, recipe in custom_modes.items():
        if mode_id in offered:
            raise ValueError(f"custom mode {mode_id!r} is already a mode")
        mode = RenderMode(id=mode_id, label=mode_id, approximate=recipe.approximate, detail=recipe.describe())
        offered[mode_id] = (mode, recipe)
    if not offered:
        raise ValueError("an engine needs at least one mode")
    return offered
