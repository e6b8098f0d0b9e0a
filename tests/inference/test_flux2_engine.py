"""The flux2 engine on the tiny klein configuration: real diffusers components and pipeline code, on CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engines.base import OUTPUT_SIZE, Engine, FrameJob
from inference.engines.flux2 import Float8Linear, Flux2Engine, create_flux2_engine

# Batched matrix products sum in a different order than single ones; on the tiny float32 model that moves
# pixels by up to ~1e-4 (out of [0, 1]).
BATCH_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def engine() -> Flux2Engine:
    engine = create_flux2_engine(tiny=True, device="cpu", max_batch=4)
    engine.load()
    return engine


def _frame(seed: int, height: int = OUTPUT_SIZE, width: int = OUTPUT_SIZE) -> np.ndarray:
    """A smooth random image (H, W, 3) uint8: webcam-like, and JPEG-friendly."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def _job(frame_id: int, jpeg: bytes, prompt: str, seed: int, steps: int = 2) -> FrameJob:
    return FrameJob(
        session_id=f"s{seed}", frame_id=frame_id, jpeg=jpeg, prompt=prompt, steps=steps, seed=seed
    )


def _decode(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG"
        assert image.size == (OUTPUT_SIZE, OUTPUT_SIZE)
        return np.asarray(image.convert("RGB"))


def test_factory_is_lazy_and_satisfies_the_engine_protocol() -> None:
    engine = create_flux2_engine(tiny=True, device="cpu")
    assert isinstance(engine, Engine)
    assert engine.name == "flux2"
    assert "tiny" in engine.model
    assert engine.pipe is None  # nothing is built before warm_up() / render()
    engine.warm_up()
    assert engine.pipe is not None


def test_render_returns_one_512_jpeg_per_job(engine: Flux2Engine) -> None:
    webcam = _jpeg(_frame(1, height=480, width=640))  # 4:3, center-cropped and resized by the engine
    square = _jpeg(_frame(2))
    out = engine.render([_job(0, webcam, "oil painting", seed=3), _job(0, square, "clay", seed=4)])
    assert len(out) == 2
    images = [_decode(jpeg) for jpeg in out]
    assert not np.array_equal(images[0], images[1])
    assert engine.render([]) == []


@pytest.mark.parametrize("steps", [2, 4])
def test_exact_mode_matches_flux2klein_pipeline(engine: Flux2Engine, steps: int) -> None:
    frame = _frame(5)
    ours = engine.render_frames(_as_tensor(frame), ["a clay sculpture"], steps=steps, seeds=[11])
    reference = engine.pipe(
        image=Image.fromarray(frame),
        prompt="a clay sculpture",
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator(device="cpu").manual_seed(11),
        output_type="pt",
    ).images
    assert ours.shape == (1, 3, OUTPUT_SIZE, OUTPUT_SIZE)
    assert ours.std() > 0.01  # a real image, not a constant
    assert torch.equal(ours, reference)


def test_render_is_decode_render_frames_encode(engine: Flux2Engine) -> None:
    jpeg = _jpeg(_frame(6))
    decoded = engine.decode_frames([jpeg])
    assert decoded.dtype == torch.uint8
    assert decoded.shape == (1, 3, OUTPUT_SIZE, OUTPUT_SIZE)
    expected = engine.encode_jpegs(engine.render_frames(decoded, ["ink"], steps=2, seeds=[1]))
    assert engine.render([_job(0, jpeg, "ink", seed=1)]) == expected


def test_prompt_embeddings_are_computed_once_per_prompt(engine: Flux2Engine) -> None:
    calls: list[int] = []
    hook = engine.pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        jpeg = _jpeg(_frame(7))
        engine.render(
            [_job(0, jpeg, "watercolor, soft light", seed=1), _job(0, jpeg, "watercolor, soft light", seed=2)]
        )
        assert len(calls) == 1
        engine.render([_job(1, jpeg, "watercolor, soft light", seed=1), _job(1, jpeg, "charcoal", seed=2)])
        assert len(calls) == 2
    finally:
        hook.remove()


def test_prompt_cache_evicts_least_recently_used() -> None:
    engine = create_flux2_engine(tiny=True, device="cpu", prompt_cache_size=2)
    engine.load()
    calls: list[int] = []
    engine.pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    for prompt in ["a", "b", "a", "c"]:  # "b" is the least recently used when "c" arrives
        engine.prompt_embeds(prompt)
    assert len(calls) == 3
    engine.prompt_embeds("a")
    assert len(calls) == 3
    engine.prompt_embeds("b")
    assert len(calls) == 4


def test_same_seed_gives_same_output_and_other_seeds_differ(engine: Flux2Engine) -> None:
    frame = _as_tensor(_frame(8))
    first = engine.render_frames(frame, ["pixel art"], steps=2, seeds=[42])
    again = engine.render_frames(frame, ["pixel art"], steps=2, seeds=[42])
    other = engine.render_frames(frame, ["pixel art"], steps=2, seeds=[43])
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.01


def test_batched_prompts_match_their_single_job_results(engine: Flux2Engine) -> None:
    # Same frame and seed in every row, so only the prompt can tell the rows apart.
    frame = _as_tensor(_frame(9))
    prompts = ["oil painting, thick brush strokes", "claymation, soft plasticine", "pixel art, 8-bit palette"]
    batch = engine.render_frames(frame.expand(3, -1, -1, -1), prompts, steps=2, seeds=[5, 5, 5])
    singles = [engine.render_frames(frame, [prompt], steps=2, seeds=[5])[0] for prompt in prompts]
    for row, single in enumerate(singles):
        own = (batch[row] - single).abs().max()
        assert own < BATCH_TOLERANCE
        # Each row is the render of its own prompt: far closer to it than to any other prompt's render.
        for other_row, other in enumerate(singles):
            if other_row != row:
                assert (batch[row] - other).abs().max() > 5 * own


def test_render_groups_jobs_by_steps_and_keeps_their_order(engine: Flux2Engine) -> None:
    jobs = [
        _job(0, _jpeg(_frame(10)), "oil painting", seed=1, steps=2),
        _job(0, _jpeg(_frame(11)), "claymation", seed=2, steps=4),
        _job(1, _jpeg(_frame(12)), "pixel art", seed=3, steps=0),  # 0: the engine's default, 2 steps
    ]
    batch_sizes: list[int] = []
    hook = engine.pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: batch_sizes.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    try:
        together = [_decode(jpeg).astype(int) for jpeg in engine.render(jobs)]
    finally:
        hook.remove()
    # The two 2-step jobs share one batch (2 transformer calls of 2 rows); the 4-step job runs alone.
    assert batch_sizes == [2, 2, 1, 1, 1, 1]
    alone = [_decode(engine.render([job])[0]).astype(int) for job in jobs]
    for mine, reference in zip(together, alone, strict=True):
        assert np.abs(mine - reference).mean() < 0.5
    assert np.abs(together[0] - together[2]).mean() > 5


def test_render_rejects_more_jobs_than_max_batch(engine: Flux2Engine) -> None:
    jpeg = _jpeg(_frame(14))
    with pytest.raises(ValueError, match="at most 4"):
        engine.render([_job(i, jpeg, "x", seed=1) for i in range(5)])


def test_float8_linear_approximates_the_bf16_product() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(3, 10, 64)
    fp8 = Float8Linear(linear)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        expected, actual = linear(x), fp8(x)
    assert actual.shape == expected.shape
    relative_error = (actual - expected).norm() / expected.norm()
    # e4m3 keeps 3 mantissa bits: a few percent per element, averaging down over a dot product.
    assert 1e-4 < relative_error < 0.05


def test_approximate_options_stay_close_to_exact(engine: Flux2Engine) -> None:
    frame = _as_tensor(_frame(15))
    exact = engine.render_frames(frame, ["oil painting"], steps=2, seeds=[3])
    approximate = create_flux2_engine(tiny=True, device="cpu", mode="approximate", fp8=True, text_tokens=64)
    approximate.load()
    blocks = approximate.pipe.transformer.single_transformer_blocks[0]
    assert isinstance(blocks.attn.to_qkv_mlp_proj, Float8Linear)
    calls: list[int] = []
    approximate.pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True,
    )
    output = approximate.render_frames(frame, ["oil painting"], steps=2, seeds=[3])
    assert calls == [64, 64]  # the transformer saw 64 prompt tokens per step
    difference = (output - exact).abs()
    assert 0 < difference.max() < 0.1
    assert difference.mean() < 0.01


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        create_flux2_engine(tiny=True, mode="fastest-possible")
    with pytest.raises(ValueError, match="dtype"):
        create_flux2_engine(tiny=True, dtype="int8")
    with pytest.raises(ValueError, match="approximate"):
        create_flux2_engine(tiny=True, fp8=True)
    with pytest.raises(ValueError, match="approximate"):
        create_flux2_engine(tiny=True, text_tokens=128)
    with pytest.raises(ValueError, match="text_tokens"):
        create_flux2_engine(tiny=True, mode="approximate", text_tokens=0)
