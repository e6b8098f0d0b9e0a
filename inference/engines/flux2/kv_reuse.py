"""Reference K/V reuse, as ``Flux2KleinKVPipeline`` runs it.

At the first step the reference frame's tokens attend only to themselves, at timestep 0, so their keys
and values do not depend on the step: they are computed once, kept per layer, and the later steps run on
the noise and text tokens alone, attending to the kept ones. The reference tokens then cost one pass per
frame instead of one per step. For checkpoints distilled for it (``FLUX.2-klein-*-kv``) this is the
model's own arithmetic; on the plain klein weights it is an approximation.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
)


def use_kv_attention(transformer: Flux2Transformer2DModel) -> None:
    """Give the transformer the attention processors that can extract and reuse reference K/V (as
    Flux2KleinKVPipeline does). Called without K/V arguments they compute what the default ones do."""
    for block in transformer.transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVAttnProcessor):
            block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVParallelSelfAttnProcessor):
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


class ReferenceKV:
    """The reference keys and values of one denoising loop: a new one for every loop."""

    def __init__(self) -> None:
        self.cache: Any = None

    def predict(
        self,
        transformer: Flux2Transformer2DModel,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        reference: torch.Tensor,
        reference_ids: torch.Tensor,
        text: dict[str, Any],
    ) -> torch.Tensor:
        """One step's prediction for the noise tokens: the first step extracts the reference K/V, the
        later ones attend to them. ``text`` is the rest of the transformer's keyword arguments."""
        if self.cache is None:
            # Reference tokens first, their K/V kept per layer; the output holds the noise tokens only.
            noise_pred, self.cache = transformer(
                hidden_states=torch.cat([reference, latents], dim=1).to(transformer.dtype),
                img_ids=torch.cat([reference_ids, latent_ids], dim=1),
                kv_cache_mode="extract",
                num_ref_tokens=reference.shape[1],
                **text,
            )
            return noise_pred
        return transformer(
            hidden_states=latents.to(transformer.dtype),
            img_ids=latent_ids,
            kv_cache=self.cache,
            kv_cache_mode="cached",
            **text,
        )[0]
