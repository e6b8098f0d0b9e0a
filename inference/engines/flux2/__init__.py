"""The ``flux2`` engine: live restyling with FLUX.2 [klein] 4B through diffusers' components.

* ``engine.py``: the render path, top to bottom: the prompt's embedding and the seed's noise, the frame
  encoded as the reference image, the denoising steps, the decode.
* ``config.py``: ``Flux2Config``, everything the engine is built from; ``recipes.py``: the render modes,
  each a ``ModeRecipe`` of the approximations it applies.
* One module per acceleration: ``fp8.py`` (FP8 linear layers), ``kv_reuse.py`` (the reference frame's keys
  and values computed once per frame), ``compiled.py`` (torch.compile scopes), ``cuda_graphs.py`` (a frame
  replayed as one CUDA graph); ``transformer.py`` is where a mode's transformer is chosen and called.
* ``frames.py``: JPEG codecs (nvJPEG on CUDA); ``checkpoint.py``: where the weights come from;
  ``klein_config.py``: the architecture, built with random weights for benchmarks and tests.

docs/performance.md has what each mode and acceleration costs and buys.
"""

from __future__ import annotations

from typing import Any

from inference.engines.flux2.config import DEFAULT_MODEL, Flux2Config
from inference.engines.flux2.engine import Flux2Engine
from inference.engines.flux2.fp8 import Float8Linear
from inference.engines.flux2.recipes import MODE_RECIPES, ModeRecipe

__all__ = [
    "DEFAULT_MODEL",
    "MODE_RECIPES",
    "Float8Linear",
    "Flux2Config",
    "Flux2Engine",
    "ModeRecipe",
    "create_flux2_engine",
]


def create_flux2_engine(**options: Any) -> Flux2Engine:
    """The engine registry's factory; ``options`` are ``Flux2Config``'s fields. Returns at once: weights are
    loaded by ``warm_up()`` (or the first ``render()``)."""
    return Flux2Engine(Flux2Config(**options))
