"""Reference K/V reuse, as ``Flux2KleinKVPipeline`` runs it.

At the first step the reference frame's tokens attend only to themselves, at timestep 0, so their keys
and values do not depend on the step: they are computed once, kept per layer, and the later steps run on
the noise and text tokens alone, attending to the kept ones. The reference tokens then cost one pass per
frame instead of one per step. For checkpoints distilled for it (``FLUX.2-klein-*-kv``) this is the
model's own arithmetic; on the plain klein weights it is an approximation.

With several reference images (the frame and a session's style image) the pipeline's reference tokens
attend to each other, so the style image's keys and values change with every frame. ``reference_kv``
computes the keys and values of one reference image alone (its tokens attending only to themselves), and
``merge`` joins such caches: the style image's are then computed once per style image and joined with each
frame's, a further approximation (each reference image no longer sees the other) that spares the style
tokens every per-frame pass.
"""

from __future__ import annotations

from typing import Any, Final

import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVCache,
    Flux2KVParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
)

# Text tokens given to a pass that computes reference keys and values alone. The reference tokens attend
# only to themselves and are modulated by their own fixed timestep, so the text changes nothing they
# compute; the transformer still wants a text stream, and a few tokens (a multiple of 16, as FP8 products
# want) keep it cheap.
REFERENCE_PASS_TEXT_TOKENS: Final = 16


def use_kv_attention(transformer: Flux2Transformer2DModel) -> None:
    """Give the transformer the attention processors that can extract and reuse reference K/V (as
    Flux2KleinKVPipeline does). Called without K/V arguments they compute what the default ones do."""
    for block in transformer.transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVAttnProcessor):
            block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVParallelSelfAttnProcessor):
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


def reference_kv(
    transformer: Flux2Transformer2DModel,
    reference: torch.Tensor,
    reference_ids: torch.Tensor,
    text: dict[str, Any],
) -> Flux2KVCache:
    """The per-layer keys and values of ``reference`` (B, tokens, C) attending only to themselves, as the
    first step of Flux2KleinKVPipeline computes them, from a pass without noise tokens. ``text`` is the
    rest of the transformer's keyword arguments; only its first REFERENCE_PASS_TEXT_TOKENS tokens are run."""
    tokens = min(REFERENCE_PASS_TEXT_TOKENS, text["encoder_hidden_states"].shape[1])
    short = {
        **text,
        "encoder_hidden_states": text["encoder_hidden_states"][:, :tokens],
        "txt_ids": text["txt_ids"][:, :tokens],
    }
    _, cache = transformer(
        hidden_states=reference.to(transformer.dtype),
        img_ids=reference_ids,
        kv_cache_mode="extract",
        num_ref_tokens=reference.shape[1],
        **short,
    )
    return cache


def stack_kv(cache: Flux2KVCache) -> torch.Tensor:
    """A cache's keys and values as one tensor (layers, 2, B, tokens, heads, head_dim), double blocks
    first: one buffer a captured CUDA graph can take as an input."""
    layers = [*cache.double_block_caches, *cache.single_block_caches]
    return torch.stack([torch.stack(layer.get()) for layer in layers])


def merge(cache: Flux2KVCache, stacked: torch.Tensor) -> Flux2KVCache:
    """``cache`` with the keys and values of ``stacked`` (``stack_kv``'s form) appended after its own in
    every layer: attending to the result is attending to both sets of reference tokens."""
    layers = [*cache.double_block_caches, *cache.single_block_caches]
    if stacked.shape[0] != len(layers):
        raise ValueError(f"{stacked.shape[0]} layers of keys and values for a {len(layers)}-layer cache")
    merged = Flux2KVCache(len(cache.double_block_caches), len(cache.single_block_caches))
    for layer, into, (keys, values) in zip(
        layers, [*merged.double_block_caches, *merged.single_block_caches], stacked, strict=True
    ):
        own_keys, own_values = layer.get()
        into.store(torch.cat([own_keys, keys], dim=1), torch.cat([own_values, values], dim=1))
    merged.num_ref_tokens = cache.num_ref_tokens + stacked.shape[3]
    return merged


class ReferenceKV:
    """The reference keys and values of one denoising loop: a new one for every loop. Given a ``cache``
    (reference_kv, merge), every step attends to it; otherwise the first step extracts it."""

    def __init__(self, cache: Flux2KVCache | None = None) -> None:
        self.cache = cache

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
