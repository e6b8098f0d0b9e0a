"""A style image as the flux2 engine's second reference image, on the tiny klein configuration (CPU)."""

from __future__ import annotations

import gc
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engines.base import FrameJob
from inference.engines.flux2 import Flux2Engine, ModeRecipe, create_flux2_engine
from inference.engines.flux2.kv_reuse import ReferenceKV, reference_kv
from inference.engines.flux2.recipes import MODE_RECIPES
from inference.protocol import OUTPUT_SIZE, STYLE_IMAGE_SIZE
from inference.style_image import StyleImage, style_image_from_pixels
from tests.inference.engines.flux2.test_engine import (
    BATCH_TOLERANCE,
    _as_tensor,
    _decode,
    _frame,
    _jpeg,
    pipeline_output,
)


@pytest.fixture(scope="module")
def engine() -> Flux2Engine:
    engine = create_flux2_engine(
        tiny=True,
        device="cpu",
        max_batch=4,
        modes=("exact", "fast"),
        custom_modes={
            "small-style": ModeRecipe(style_size=256),
            # The fast mode as it was before style_kv_once: the style image's keys and values per frame.
            "style-per-frame": replace(MODE_RECIPES["fast"][1], style_kv_once=False),
        },
    )
    engine.load()
    return engine


def _style(seed: int) -> StyleImage:
    """A style picture unlike any webcam frame: hard-edged stripes in two saturated colours."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    stripes = (np.arange(STYLE_IMAGE_SIZE)[:, None] + np.arange(STYLE_IMAGE_SIZE)[None, :]) // 32 % 2
    return style_image_from_pixels(colours[stripes])


def _job(frame_id: int, jpeg: bytes, seed: int, style: StyleImage | None, mode: str = "") -> FrameJob:
    return FrameJob(f"s{seed}", frame_id, jpeg, "a poster", 2, seed, mode, style)


def _encoder_calls(engine: Flux2Engine) -> tuple[list[int], object]:
    calls: list[int] = []
    hook = engine.pipe.vae.encoder.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    return calls, hook


def test_exact_mode_with_a_style_image_matches_flux2klein_pipeline_with_two_images(
    engine: Flux2Engine,
) -> None:
    frame = _frame(21)
    style = _style(1)
    ours = engine.render_frames(_as_tensor(frame), ["a clay sculpture"], steps=2, seeds=[7], styles=[style])
    reference = pipeline_output(
        engine.pipe, [Image.fromarray(frame), style.image], "a clay sculpture", steps=2, seed=7
    )
    assert ours.std() > 0.01
    assert torch.equal(ours, reference)
    # The style image is read: without it the same frame, prompt and seed render otherwise.
    plain = engine.render_frames(_as_tensor(frame), ["a clay sculpture"], steps=2, seeds=[7])
    assert (plain - ours).abs().max() > 0.01


def test_the_style_image_is_encoded_once_not_per_frame(engine: Flux2Engine) -> None:
    style = _style(2)
    encoded = engine.styles.encoded
    calls, hook = _encoder_calls(engine)
    try:
        for frame_id in range(3):
            engine.render([_job(frame_id, _jpeg(_frame(30 + frame_id)), 1, style)])
    finally:
        hook.remove()
    # One encoder pass per frame, and one for the style image, on its first frame only.
    assert sorted(calls) == [1, 1, 1, 1]
    assert engine.styles.encoded == encoded + 1
    assert engine.styles.latents(style, STYLE_IMAGE_SIZE) is engine.styles.latents(style, STYLE_IMAGE_SIZE)


def test_an_engine_forgets_a_style_image_once_its_session_lets_go(engine: Flux2Engine) -> None:
    gc.collect()
    before = len(engine.styles)
    style: StyleImage | None = _style(3)
    engine.render([_job(0, _jpeg(_frame(40)), 1, style)])
    assert len(engine.styles) == before + 1
    style = None
    gc.collect()
    assert len(engine.styles) == before


def test_jobs_with_and_without_a_style_image_render_in_one_call_as_they_would_alone(
    engine: Flux2Engine,
) -> None:
    first, second = _style(4), _style(5)
    jobs = [
        _job(0, _jpeg(_frame(50)), 1, first),
        _job(0, _jpeg(_frame(50)), 1, None),
        _job(0, _jpeg(_frame(52)), 3, second),
        _job(0, _jpeg(_frame(52)), 3, None),
    ]
    batches: list[tuple[int, int]] = []
    hook = engine.pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: batches.append(tuple(kwargs["hidden_states"].shape[:2])),
        with_kwargs=True,
    )
    try:
        together = [_decode(jpeg).astype(int) for jpeg in engine.render(jobs)]
    finally:
        hook.remove()
    # Two transformer batches per step: the two styled jobs (noise + frame + style tokens), the two others.
    assert sorted(set(batches)) == [(2, 2048), (2, 3072)]
    alone = [_decode(engine.render([job])[0]).astype(int) for job in jobs]
    for mine, single in zip(together, alone, strict=True):
        assert np.abs(mine - single).mean() < 0.5  # batched sums round apart by ~1e-4 before JPEG
    # A styled row is its own style's render, not the prompt-only one (the tiny random model moves its
    # output little for a style image, but far more than batching rounds it).
    for index in (0, 2):
        own = np.abs(together[index] - alone[index]).mean()
        assert np.abs(together[index] - alone[index + 1]).mean() > 2 * own + 0.1


def _transformer_calls(engine: Flux2Engine) -> tuple[list[tuple[str | None, int]], object]:
    """(kv_cache_mode, image tokens) of each call of the FP8 transformer, and the hook to remove."""
    calls: list[tuple[str | None, int]] = []
    hook = engine.transformers.fp8.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(
            (kwargs.get("kv_cache_mode"), kwargs["hidden_states"].shape[1])
        ),
        with_kwargs=True,
    )
    return calls, hook


def test_per_frame_style_kv_computes_frame_and_style_keys_together_each_frame(engine: Flux2Engine) -> None:
    frame, style = _as_tensor(_frame(60)), _style(6)
    calls, hook = _transformer_calls(engine)
    try:
        per_frame = engine.render_frames(
            frame, ["ink"], steps=2, seeds=[3], mode="style-per-frame", styles=[style]
        )
    finally:
        hook.remove()
    # Step 1: style + frame + noise tokens, their keys/values kept; step 2: the noise tokens alone.
    assert calls == [("extract", 3072), ("cached", 1024)]
    # The style image still moves the approximate render.
    plain = engine.render_frames(frame, ["ink"], steps=2, seeds=[3], mode="style-per-frame")
    assert (per_frame - plain).abs().max() > BATCH_TOLERANCE


def test_fast_modes_compute_a_style_images_keys_once_per_image_not_per_frame(engine: Flux2Engine) -> None:
    style = _style(9)
    computed = engine.style_kv.computed
    calls, hook = _transformer_calls(engine)
    try:
        outputs = [
            _decode(engine.render([_job(frame_id, _jpeg(_frame(90 + frame_id)), 1, style, "fast")])[0])
            for frame_id in range(3)
        ]
    finally:
        hook.remove()
    # The style image's tokens alone once; then per frame the frame's tokens alone, and every step on the
    # noise tokens attending to both kept sets.
    assert calls == [("extract", 1024)] + [("extract", 1024), ("cached", 1024), ("cached", 1024)] * 3
    assert engine.style_kv.computed == computed + 1
    # Kept keys render what freshly computed ones do: the same picture as a new StyleImage renders.
    again = style_image_from_pixels(style.pixels)
    fresh = _decode(engine.render([_job(2, _jpeg(_frame(92)), 1, again, "fast")])[0])
    assert engine.style_kv.computed == computed + 2
    assert np.array_equal(fresh, outputs[2])


def test_style_kv_once_reads_the_style_image_but_not_with_the_frame(engine: Flux2Engine) -> None:
    frame, style = _as_tensor(_frame(61)), _style(10)
    once = engine.render_frames(frame, ["ink"], steps=2, seeds=[3], mode="fast", styles=[style])
    plain = engine.render_frames(frame, ["ink"], steps=2, seeds=[3], mode="fast")
    per_frame = engine.render_frames(
        frame, ["ink"], steps=2, seeds=[3], mode="style-per-frame", styles=[style]
    )
    assert (once - plain).abs().max() > BATCH_TOLERANCE  # the style image is read
    # An approximation of the per-frame scheme: the frame's tokens no longer attend to the style image's
    # (on the tiny random model that moves the output little; the bench measures it on the real shapes).
    assert not torch.equal(once, per_frame)
    # Without a style image the two recipes are the same computation.
    assert torch.equal(
        plain, engine.render_frames(frame, ["ink"], steps=2, seeds=[3], mode="style-per-frame")
    )


def test_a_reference_images_own_keys_reproduce_the_pipelines_joint_first_step(engine: Flux2Engine) -> None:
    """The building block of style_kv_once against Flux2KleinKVPipeline's scheme: with one reference image,
    its keys and values computed alone and then attended to give the first step's prediction that the
    joint pass (reference and noise tokens together) gives."""
    transformer = engine.transformers.fp8
    generator = torch.Generator().manual_seed(5)
    channels = engine.transformers.fp8.config.in_channels
    reference = torch.randn(1, 1024, channels, generator=generator)
    latents = torch.randn(1, 1024, channels, generator=generator)
    prompt_embeds = engine.prompt_embeds("ink")[:, :128]
    text = engine._text_kwargs(prompt_embeds, engine._txt_ids(prompt_embeds), torch.full((1,), 0.7))
    latent_ids = engine._latent_ids
    reference_ids = engine._reference_latent_ids(OUTPUT_SIZE)
    with torch.no_grad():
        joint = ReferenceKV().predict(transformer, latents, latent_ids, reference, reference_ids, text)
        alone = ReferenceKV(reference_kv(transformer, reference, reference_ids, text))
        split = alone.predict(transformer, latents, latent_ids, reference, reference_ids, text)
    assert joint.std() > 0.01
    assert (joint - split).abs().max() < 1e-4


def test_two_sessions_style_keys_stay_their_own_in_one_batch(engine: Flux2Engine) -> None:
    first, second = _style(11), _style(12)
    jobs = [_job(0, _jpeg(_frame(62)), 1, first, "fast"), _job(0, _jpeg(_frame(63)), 2, second, "fast")]
    together = [_decode(jpeg).astype(int) for jpeg in engine.render(jobs)]
    alone = [_decode(engine.render([job])[0]).astype(int) for job in jobs]
    for mine, single in zip(together, alone, strict=True):
        assert np.abs(mine - single).mean() < 0.5
    swapped = [_decode(engine.render([replace(jobs[0], style=second)])[0]).astype(int)]
    # The first row rendered with its own style image, not the other row's.
    own = np.abs(together[0] - alone[0]).mean()
    assert np.abs(together[0] - swapped[0]).mean() > 2 * own + 0.1


def test_an_engine_forgets_a_style_images_keys_once_its_session_lets_go(engine: Flux2Engine) -> None:
    gc.collect()
    before = len(engine.style_kv)
    style: StyleImage | None = _style(13)
    engine.render([_job(0, _jpeg(_frame(64)), 1, style, "fast")])
    assert len(engine.style_kv) == before + 1
    style = None
    gc.collect()
    assert len(engine.style_kv) == before


def test_a_smaller_style_size_reads_the_style_image_at_fewer_tokens(engine: Flux2Engine) -> None:
    frame, style = _as_tensor(_frame(70)), _style(7)
    calls: list[int] = []
    hook = engine.pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        small = engine.render_frames(frame, ["ink"], steps=2, seeds=[3], mode="small-style", styles=[style])
    finally:
        hook.remove()
    assert calls == [1024 + 1024 + 256, 1024 + 1024 + 256]
    full = engine.render_frames(frame, ["ink"], steps=2, seeds=[3], styles=[style])
    plain = engine.render_frames(frame, ["ink"], steps=2, seeds=[3])
    # Another reading of the same style image: neither the full-size one nor none at all.
    assert (small - full).abs().max() > BATCH_TOLERANCE
    assert (small - plain).abs().max() > BATCH_TOLERANCE
    assert small.shape == (1, 3, OUTPUT_SIZE, OUTPUT_SIZE)


def test_render_frames_wants_one_style_image_per_frame(engine: Flux2Engine) -> None:
    frames = _as_tensor(_frame(80)).expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match="style images"):
        engine.render_frames(frames, ["a", "b"], steps=2, seeds=[1, 2], styles=[_style(8)])
