"""The engine's prompt embeddings against Flux2KleinPipeline's own, with a text encoder as deep as
Qwen3-4B's 36 layers (the tiny configuration's widths): real transformers and diffusers code on CPU."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from inference.engines.flux2 import Flux2Config, Flux2Engine
from inference.engines.flux2.klein_config import MAX_SEQUENCE_LENGTH, TINY, build_random_components
from inference.engines.flux2.prompts import TEXT_ENCODER_LAYERS
from tests.inference.engines.flux2.test_engine import _as_tensor, _frame, pipeline_output

DEEP = replace(TINY, name="tiny-36-layer-text", text_encoder={**TINY.text_encoder, "num_hidden_layers": 36})
# Byte-level tokens: longer than MAX_SEQUENCE_LENGTH, so the pipeline truncates it and pads nothing.
LONG_PROMPT = "a watercolor landscape with rolling hills, " * 20


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    return build_random_components(DEEP, seed=5)


def _pipeline(components: dict[str, Any], text_encoder: torch.nn.Module) -> Flux2KleinPipeline:
    return Flux2KleinPipeline(**{**components, "text_encoder": text_encoder}, is_distilled=True)


def _parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_the_embedding_is_the_pipelines_bit_for_bit_from_fewer_layers(components: dict[str, Any]) -> None:
    full = copy.deepcopy(components["text_encoder"])
    pipe = _pipeline(components, copy.deepcopy(full))
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu"), pipeline=pipe)
    engine.load()
    assert len(components["tokenizer"](LONG_PROMPT)["input_ids"]) > MAX_SEQUENCE_LENGTH
    for prompt in ("an oil painting, thick brushwork", LONG_PROMPT):
        reference = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=full, tokenizer=components["tokenizer"], prompt=prompt, device=torch.device("cpu")
        )
        ours = engine.prompt_embeds(prompt)
        assert ours.shape == reference.shape
        assert torch.equal(ours, reference)
    kept = engine.pipe.text_encoder
    assert len(kept.model.layers) == TEXT_ENCODER_LAYERS == 28
    # The 8 layers dropped held their share of the decoder's weights (the embedding table stays).
    per_layer = _parameters(full.model.layers[0])
    assert _parameters(full) - _parameters(kept) == 8 * per_layer


def test_an_exact_frame_equals_the_pipelines_with_its_whole_text_encoder(components: dict[str, Any]) -> None:
    reference_pipe = _pipeline(components, copy.deepcopy(components["text_encoder"]))
    engine = Flux2Engine(
        Flux2Config(tiny=True, device="cpu"),
        pipeline=_pipeline(components, copy.deepcopy(components["text_encoder"])),
    )
    engine.load()
    frame = _frame(3)
    ours = engine.render_frames(_as_tensor(frame), ["a clay sculpture"], steps=2, seeds=[7])
    reference = pipeline_output(reference_pipe, Image.fromarray(frame), "a clay sculpture", steps=2, seed=7)
    assert len(reference_pipe.text_encoder.model.layers) == 36  # the reference ran all of its layers
    assert ours.std() > 0.01
    assert torch.equal(ours, reference)
