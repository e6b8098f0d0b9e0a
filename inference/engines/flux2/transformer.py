"""The transformer as the denoising loop uses it: which copy a mode runs on, and one step's prediction.

The checkpoint's bf16 transformer serves the modes without FP8, so they stay exact; the modes with FP8 run
on a quantized copy (fp8.py). Whatever changes the transformer for a mode or a session is set up here,
once per copy, and everything that calls it goes through ``Transformers.for_recipe`` (setting it up) or
``Transformers.for_denoising`` (calling it in the denoising loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

from inference.engines.flux2.compiled import Backend, compile_transformers, whole_graph
from inference.engines.flux2.fp8 import quantized_copy
from inference.engines.flux2.kv_reuse import use_kv_attention
from inference.engines.flux2.lora import LoraBank, LoraSelection, MultiLoraLinear, apply_lora
from inference.engines.flux2.noise_rows import computing_rows, use_noise_rows_attention
from inference.engines.flux2.recipes import ModeRecipe


class Transformers:
    """The transformer copies an engine's modes run on: ``exact`` always, ``fp8`` when a mode needs it.
    With a ``lora`` bank, both carry every adapter's low-rank branches (lora.py), ``lora`` is where the
    engine says which adapter each row of the next batch applies, and ``prepare_lora`` fuses a batch's one
    adapter into the weights of the transformer that renders it."""

    def __init__(
        self,
        exact: Flux2Transformer2DModel,
        recipes: Iterable[ModeRecipe],
        *,
        lora: LoraBank | None = None,
        max_batch: int = 1,
    ) -> None:
        recipes = list(recipes)
        self.exact = exact
        self.fp8: Flux2Transformer2DModel | None = (
            quantized_copy(exact) if any(recipe.fp8 for recipe in recipes) else None
        )
        self.lora: LoraSelection | None = None
        # Recipes whose denoising loop calls their copy compiled as one graph (``compile``), by copy.
        self._whole_graph: dict[ModeRecipe, torch.nn.Module] = {}
        self._lora_layers: dict[int, list[MultiLoraLinear]] = {}
        if lora is not None and lora.targets:
            # After the FP8 copy is made: it quantizes the base layers, the branches stay in the model dtype,
            # and its layers fuse adapters from the bf16 transformer's unfused weights (it keeps none).
            self.lora = LoraSelection(lora, max_batch, exact.device)
            self._lora_layers[id(exact)] = apply_lora(exact, self.lora)
            if self.fp8 is not None:
                self._lora_layers[id(self.fp8)] = apply_lora(self.fp8, self.lora, weights_from=exact)
        for recipe in recipes:
            if recipe.reference_kv_reuse:
                use_kv_attention(self.for_recipe(recipe))

    def for_recipe(self, recipe: ModeRecipe) -> Flux2Transformer2DModel:
        if recipe.fp8:
            assert self.fp8 is not None
            return self.fp8
        return self.exact

    def for_denoising(self, recipe: ModeRecipe) -> torch.nn.Module:
        """What the recipe's denoising loop calls: its copy, or that copy compiled as one graph."""
        whole = self._whole_graph.get(recipe)
        return self.for_recipe(recipe) if whole is None else whole

    def compile(
        self, *, scope: str, whole_graph_recipes: Iterable[ModeRecipe] = (), backend: Backend = "inductor"
    ) -> None:
        """Compile both copies in place by ``scope`` (compiled.COMPILE_SCOPES); the recipes in
        ``whole_graph_recipes`` denoise with their copy compiled as one graph besides (compiled.whole_graph),
        which under the "full" scope it already is. The exact copy's last single block computes only the
        rows a step's prediction reads (noise_rows.py), a rounding-level difference as compilation's, so
        the uncompiled engine stays the pipeline's arithmetic to the bit."""
        use_noise_rows_attention(self.exact)
        compile_transformers(self.exact, self.fp8, scope=scope, backend=backend)
        self._whole_graph.clear()
        if scope == "full":
            return
        graphs: dict[int, torch.nn.Module] = {}
        for recipe in whole_graph_recipes:
            copy = self.for_recipe(recipe)
            if id(copy) not in graphs:
                graphs[id(copy)] = whole_graph(copy, backend=backend)
            self._whole_graph[recipe] = graphs[id(copy)]

    def prepare_lora(self, recipe: ModeRecipe) -> None:
        """Bring the adapted layers of the recipe's transformer to what the LoRA selection asks for the next
        batch: the batch's one adapter fused into their weights, or their unfused weights (no adapter, or
        per-row branches). Nothing is written when they already hold it."""
        if self.lora is None:
            return
        choice = None if self.lora.branches else self.lora.fused
        layers = self._lora_layers[id(self.for_recipe(recipe))]
        if layers and layers[0].fused == choice:
            return  # every frame of a session asks for what the last one did; the layers change together
        for layer in layers:
            layer.fuse(choice)

    def __iter__(self) -> Iterator[Flux2Transformer2DModel]:
        yield self.exact
        if self.fp8 is not None:
            yield self.fp8


def predict(
    transformer: Flux2Transformer2DModel,
    latents: torch.Tensor,
    latent_ids: torch.Tensor,
    reference: torch.Tensor,
    reference_ids: torch.Tensor,
    text: dict[str, Any],
) -> torch.Tensor:
    """One step's prediction for the noise tokens, as Flux2KleinPipeline makes it: the reference frame's
    tokens appended after the noise tokens, attended to jointly. ``text`` is the rest of the transformer's
    keyword arguments."""
    # The joint sequence is the prompt's tokens, then these: its noise rows are the prediction.
    text_tokens = text["encoder_hidden_states"].shape[1]
    with computing_rows(transformer, text_tokens, text_tokens + latents.shape[1]):
        noise_pred = transformer(
            hidden_states=torch.cat([latents, reference], dim=1).to(transformer.dtype),
            img_ids=torch.cat([latent_ids, reference_ids], dim=1),
            **text,
        )[0]
    return noise_pred[:, : latents.shape[1]]
