"""The last single block computed for the noise rows only (noise_rows.py), on the tiny klein model: the
prediction a step reads is the full block's, and nothing else changes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVParallelSelfAttnProcessor,
    Flux2ParallelSelfAttnProcessor,
)

from inference.adapters import AdapterSpec
from inference.engines.flux2 import ModeRecipe, create_flux2_engine
from inference.engines.flux2.klein_config import TINY, build_random_components
from inference.engines.flux2.noise_rows import (
    NoiseRowsAttnProcessor,
    computing_rows,
    use_noise_rows_attention,
)
from inference.engines.flux2.transformer import predict
from tests.inference.engines.flux2.test_engine import _as_tensor, _frame, _GraphRecorder
from tests.inference.engines.flux2.test_lora import write_lora

NOISE, REFERENCE, TEXT = 64, 64, 32


def _inputs(dtype: torch.dtype, text_tokens: int = TEXT) -> dict[str, Any]:
    config = TINY.transformer
    generator = torch.Generator().manual_seed(1)
    latent_ids = torch.zeros(1, NOISE, 4, dtype=torch.long)
    latent_ids[..., 1] = torch.arange(NOISE) // 8
    latent_ids[..., 2] = torch.arange(NOISE) % 8
    reference_ids = latent_ids.clone()
    reference_ids[..., 0] = 10
    txt_ids = torch.zeros(1, text_tokens, 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(text_tokens)
    channels = config["in_channels"]
    return {
        "latents": torch.randn(1, NOISE, channels, generator=generator).to(dtype),
        "latent_ids": latent_ids,
        "reference": torch.randn(1, REFERENCE, channels, generator=generator).to(dtype),
        "reference_ids": reference_ids,
        "text": {
            "timestep": torch.tensor([0.6], dtype=dtype),
            "guidance": None,
            "encoder_hidden_states": torch.randn(
                1, text_tokens, config["joint_attention_dim"], generator=generator
            ).to(dtype),
            "txt_ids": txt_ids,
            "joint_attention_kwargs": None,
            "return_dict": False,
        },
    }


def _transformers(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny transformer with its default processors, and a copy whose last single block has the
    noise-rows one."""
    plain = build_random_components(TINY, dtype=dtype)["transformer"]
    rows = copy.deepcopy(plain)
    assert use_noise_rows_attention(rows)
    return plain, rows


def _rows_into_output_projection(transformer: torch.nn.Module) -> tuple[list[int], Any]:
    """Record how many rows the last single block's output projection multiplies at each call."""
    seen: list[int] = []
    layer = transformer.single_transformer_blocks[-1].attn.to_out
    return seen, layer.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prediction_is_the_full_blocks_and_only_the_noise_rows_are_computed(dtype: torch.dtype) -> None:
    plain, rows = _transformers(dtype)
    inputs = _inputs(dtype)
    seen, hook = _rows_into_output_projection(rows)
    expected = predict(plain, **inputs)
    got = predict(rows, **inputs)
    hook.remove()
    # On a CPU the products over fewer rows sum in the same order: the same bits.
    assert torch.equal(got, expected)
    assert seen == [NOISE]  # of TEXT + NOISE + REFERENCE


@torch.no_grad()
def test_the_rows_come_from_the_call_and_other_callers_get_the_full_block() -> None:
    plain, rows = _transformers(torch.float32)
    inputs = _inputs(torch.float32)
    call = {
        "hidden_states": torch.cat([inputs["latents"], inputs["reference"]], dim=1),
        "img_ids": torch.cat([inputs["latent_ids"], inputs["reference_ids"]], dim=1),
        **inputs["text"],
    }
    predict(rows, **inputs)
    # Called directly (as the pipeline calls it), after a prediction: every image row is the full block's,
    # the reference rows too.
    seen, hook = _rows_into_output_projection(rows)
    assert torch.equal(rows(**call)[0], plain(**call)[0])
    hook.remove()
    assert seen == [TEXT + NOISE + REFERENCE]
    # Rows one off from the noise tokens' give another prediction: which rows are computed matters.
    with computing_rows(rows, TEXT + 1, TEXT + NOISE + 1):
        shifted = rows(**call)[0][:, :NOISE]
    assert (shifted - plain(**call)[0][:, :NOISE]).abs().max() > 1e-3


@torch.no_grad()
def test_a_shorter_prompt_moves_the_noise_rows() -> None:
    """The noise rows start after the prompt's tokens, however many the recipe attends to."""
    plain, rows = _transformers(torch.float32)
    inputs = _inputs(torch.float32, text_tokens=8)
    seen, hook = _rows_into_output_projection(rows)
    assert torch.equal(predict(rows, **inputs), predict(plain, **inputs))
    hook.remove()
    assert seen == [NOISE]


def test_only_a_block_with_the_default_processor_gets_the_noise_rows_one() -> None:
    transformer = build_random_components(TINY)["transformer"]
    attn = transformer.single_transformer_blocks[-1].attn
    attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    assert not use_noise_rows_attention(transformer)  # reference K/V reuse keeps its processor
    assert isinstance(attn.processor, Flux2KVParallelSelfAttnProcessor)
    attn.set_processor(Flux2ParallelSelfAttnProcessor())
    assert use_noise_rows_attention(transformer)
    assert use_noise_rows_attention(transformer)  # a second call changes nothing
    assert isinstance(attn.processor, NoiseRowsAttnProcessor)
    # Only the last single block: every earlier block feeds all rows forward.
    assert all(
        type(block.attn.processor) is Flux2ParallelSelfAttnProcessor
        for block in transformer.single_transformer_blocks[:-1]
    )


def test_the_compiled_exact_engine_still_renders_the_pipelines_frame() -> None:
    """Compiling gives the exact copy the noise-rows block (not the FP8 copy, whose blocks reuse reference
    keys and values); the exact frames, of the full and of a shorter prompt, are the uncompiled ones."""
    custom = {"short-prompt": ModeRecipe(text_tokens=64)}
    engine = create_flux2_engine(
        tiny=True, device="cpu", modes=("exact", "turbo"), custom_modes=custom, compile=False
    )
    engine.load()
    frames = _as_tensor(_frame(4))
    modes = ("exact", "short-prompt", "turbo")
    eager = {mode: engine.render_frames(frames, ["clay"], steps=2, seeds=[5], mode=mode) for mode in modes}
    last = engine.transformers.exact.single_transformer_blocks[-1].attn
    assert type(last.processor) is Flux2ParallelSelfAttnProcessor  # uncompiled: the pipeline's own
    engine.transformers.compile(scope="blocks", backend=_GraphRecorder())
    assert isinstance(last.processor, NoiseRowsAttnProcessor)
    fp8_last = engine.transformers.fp8.single_transformer_blocks[-1].attn
    assert isinstance(fp8_last.processor, Flux2KVParallelSelfAttnProcessor)
    seen, hook = _rows_into_output_projection(engine.transformers.exact)
    for mode in modes:
        assert torch.equal(engine.render_frames(frames, ["clay"], steps=2, seeds=[5], mode=mode), eager[mode])
    hook.remove()
    assert seen == [1024] * 4  # the 512² frame's noise tokens, at each step of exact and short-prompt


def test_adapters_fused_or_per_row_go_through_the_noise_rows_block(tmp_path: Path) -> None:
    """An adapter fused into the weights is read from the fused weight; a batch whose rows take different
    adapters runs the full block (its branches are per row): both as the uncompiled engine renders them."""
    specs = (
        AdapterSpec("clay", str(write_lora(tmp_path, "clay", seed=1))),
        AdapterSpec("ink", str(write_lora(tmp_path, "ink", seed=2))),
    )

    def engine() -> Any:
        built = create_flux2_engine(
            tiny=True, device="cpu", max_batch=2, loras=specs, modes=("exact",), compile=False
        )
        built.load()
        return built

    eager, compiled = engine(), engine()
    compiled.transformers.compile(scope="blocks", backend=_GraphRecorder())
    frames = _as_tensor(_frame(8)).expand(2, -1, -1, -1)
    seen, hook = _rows_into_output_projection(compiled.transformers.exact)
    for adapters in (["clay"], ["clay", "ink"]):
        rows = len(adapters)
        kwargs: dict[str, Any] = {"steps": 2, "seeds": [2] * rows, "adapters": adapters}
        expected = eager.render_frames(frames[:rows], ["x"] * rows, **kwargs)
        assert torch.equal(compiled.render_frames(frames[:rows], ["x"] * rows, **kwargs), expected)
    hook.remove()
    assert seen == [1024, 1024, 2560, 2560]  # fused: the noise rows; per-row branches: every row
