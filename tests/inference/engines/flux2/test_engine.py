"""The flux2 engine on the tiny klein configuration: real diffusers components and pipeline code, on CPU."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from PIL import Image

from inference.engines.base import Engine, FrameJob
from inference.engines.flux2 import Float8Linear, Flux2Engine, ModeRecipe, create_flux2_engine
from inference.engines.flux2.compiled import COMPILE_SCOPES, compile_transformers
from inference.engines.flux2.klein_config import TINY
from inference.protocol import OUTPUT_SIZE

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


def _job(frame_id: int, jpeg: bytes, prompt: str, seed: int, steps: int = 2, mode: str = "") -> FrameJob:
    return FrameJob(
        session_id=f"s{seed}", frame_id=frame_id, jpeg=jpeg, prompt=prompt, steps=steps, seed=seed, mode=mode
    )


def _token_counts(transformer: torch.nn.Module) -> tuple[list[tuple[int, int]], object]:
    """Record (image-stream tokens, text tokens) of every call of `transformer`; returns (calls, hook)."""
    calls: list[tuple[int, int]] = []
    hook = transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(
            (kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1])
        ),
        with_kwargs=True,
    )
    return calls, hook


def pipeline_output(
    pipe: Flux2KleinPipeline, image: Any, prompt: str, *, steps: int, seed: int
) -> torch.Tensor:
    """The reference the exact mode must match: ``pipe`` on the reference image(s) ``image``."""
    return pipe(
        image=image,
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="pt",
    ).images


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


def test_warm_up_warms_the_default_mode_and_defers_the_others() -> None:
    engine = create_flux2_engine(tiny=True, device="cpu")
    engine.load()
    calls, hook = _token_counts(engine.transformers.fp8)
    engine.warm_up()
    assert calls == []  # the FP8 transformer (fast, turbo) has not run: ready after exact alone
    tasks = engine.deferred_warm_ups()
    assert len(tasks) == 2
    for task in tasks:
        task()
    hook.remove()
    assert [tokens for tokens, _ in calls] == [2048, 1024, 1024 + 256, 1024]  # fast, then turbo
    assert engine.deferred_warm_ups() == []


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
    reference = pipeline_output(engine.pipe, Image.fromarray(frame), "a clay sculpture", steps=steps, seed=11)
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
    hook = engine.pipe.text_encoder.model.register_forward_hook(lambda module, args, output: calls.append(1))
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
    engine.pipe.text_encoder.model.register_forward_hook(lambda module, args, output: calls.append(1))
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


def test_render_groups_jobs_by_mode_and_steps_and_keeps_their_order(engine: Flux2Engine) -> None:
    jobs = [
        _job(0, _jpeg(_frame(10)), "oil painting", seed=1, steps=2),
        _job(0, _jpeg(_frame(11)), "claymation", seed=2, steps=4),
        _job(1, _jpeg(_frame(12)), "pixel art", seed=3, steps=0),  # 0: the engine's default, 2 steps
        _job(0, _jpeg(_frame(13)), "ukiyo-e", seed=4, steps=2, mode="turbo"),
    ]
    batch_sizes: list[int] = []
    hooks = [
        transformer.register_forward_hook(
            lambda module, args, kwargs, output: batch_sizes.append(kwargs["hidden_states"].shape[0]),
            with_kwargs=True,
        )
        for transformer in (engine.pipe.transformer, engine.transformers.fp8)
    ]
    try:
        together = [_decode(jpeg).astype(int) for jpeg in engine.render(jobs)]
    finally:
        for hook in hooks:
            hook.remove()
    # The two exact 2-step jobs share one batch (2 calls of 2 rows); the 4-step job and the turbo job
    # each run alone.
    assert batch_sizes == [2, 2, 1, 1, 1, 1, 1, 1]
    alone = [_decode(engine.render([job])[0]).astype(int) for job in jobs]
    for mine, reference in zip(together, alone, strict=True):
        assert np.abs(mine - reference).mean() < 0.5
    assert np.abs(together[0] - together[2]).mean() > 5


def test_modes_exact_first_and_approximate_ones_labelled(engine: Flux2Engine) -> None:
    assert [mode.id for mode in engine.modes] == ["exact", "fast", "turbo"]
    assert [mode.approximate for mode in engine.modes] == [False, True, True]
    assert all(mode.detail.startswith("Approximate") for mode in engine.modes[1:])
    with pytest.raises(ValueError, match="unknown mode 'sketchy'"):
        engine.render([_job(0, _jpeg(_frame(13)), "x", seed=1, mode="sketchy")])


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


def test_reference_kv_reuse_matches_flux2klein_kv_pipeline() -> None:
    from diffusers import Flux2KleinKVPipeline

    engine = create_flux2_engine(
        tiny=True, device="cpu", modes=("exact",), custom_modes={"kv": ModeRecipe(reference_kv_reuse=True)}
    )
    pipe = engine.load()
    frame = _frame(16)
    exact = engine.render_frames(_as_tensor(frame), ["a clay sculpture"], steps=3, seeds=[11])
    calls, hook = _token_counts(pipe.transformer)
    ours = engine.render_frames(_as_tensor(frame), ["a clay sculpture"], steps=3, seeds=[11], mode="kv")
    hook.remove()
    # The first step carries the 1024 reference tokens; the later ones only the 1024 noise tokens.
    assert [tokens for tokens, _ in calls] == [2048, 1024, 1024]
    kv_pipeline = Flux2KleinKVPipeline(
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        transformer=pipe.transformer,
        is_distilled=True,
    )
    kv_pipeline.set_progress_bar_config(disable=True)
    reference = kv_pipeline(
        image=Image.fromarray(frame),
        prompt="a clay sculpture",
        num_inference_steps=3,
        generator=torch.Generator(device="cpu").manual_seed(11),
        output_type="pt",
    ).images
    assert torch.equal(ours, reference)
    # ...and it is an approximation of the exact pipeline, not the same image.
    assert 0 < (ours - exact).abs().max() < 0.1


@pytest.mark.parametrize(
    ("mode", "expected_tokens"),
    [("fast", [(2048, 128), (1024, 128)]), ("turbo", [(1024 + 256, 128), (1024, 128)])],
)
def test_fast_modes_are_close_to_exact_and_do_less_work(
    engine: Flux2Engine, mode: str, expected_tokens: list[tuple[int, int]]
) -> None:
    frame = _as_tensor(_frame(15))
    exact = engine.render_frames(frame, ["oil painting"], steps=2, seeds=[3])
    fp8_transformer = engine.transformers.fp8
    assert isinstance(fp8_transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj, Float8Linear)
    # The exact mode's transformer is untouched.
    assert isinstance(
        engine.pipe.transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj, torch.nn.Linear
    )
    calls, hook = _token_counts(fp8_transformer)
    try:
        output = engine.render_frames(frame, ["oil painting"], steps=2, seeds=[3], mode=mode)
    finally:
        hook.remove()
    assert calls == expected_tokens
    assert output.shape == exact.shape
    difference = (output - exact).abs()
    assert 0 < difference.max() < 0.1
    assert difference.mean() < 0.01


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown modes"):
        create_flux2_engine(tiny=True, modes=("exact", "fastest-possible"))
    with pytest.raises(ValueError, match="at least one mode"):
        create_flux2_engine(tiny=True, modes=())
    with pytest.raises(ValueError, match="dtype"):
        create_flux2_engine(tiny=True, dtype="int8")
    with pytest.raises(ValueError, match="compile_scope"):
        create_flux2_engine(tiny=True, compile_scope="everything")
    with pytest.raises(ValueError, match="text_tokens"):
        ModeRecipe(text_tokens=0)
    with pytest.raises(ValueError, match="reference_size"):
        ModeRecipe(reference_size=100)


@pytest.mark.parametrize("scope", COMPILE_SCOPES)
def test_a_compile_scope_compiles_each_block_or_each_whole_transformer(scope: str) -> None:
    exact = Flux2Transformer2DModel(**TINY.transformer)
    fp8 = Flux2Transformer2DModel(**TINY.transformer)
    compile_transformers(exact, fp8, scope=scope)
    for transformer in (exact, fp8):
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        compiled_blocks = [block._compiled_call_impl is not None for block in blocks]
        if scope == "blocks":
            # Regional compilation: every block compiled, the transformer around them not.
            assert all(compiled_blocks)
            assert transformer._compiled_call_impl is None
        else:
            assert transformer._compiled_call_impl is not None
            assert not any(compiled_blocks)


# How dynamo names a block's parameter: "L_self_modules_single_transformer_blocks_modules_0_..."
BLOCK_PARAMETER = re.compile(r"(single_)?transformer_blocks_modules_(\d+)_")


class _GraphRecorder:
    """A torch.compile backend that runs each graph eagerly and keeps the module paths of its parameters."""

    def __init__(self) -> None:
        self.graphs: list[set[str]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append({node.name for node in gm.graph.nodes if node.op == "placeholder"})
        return gm.forward

    def blocks_in(self, graph: set[str]) -> set[str]:
        """Which blocks' weights a graph reads: {"transformer_blocks_0", "single_transformer_blocks_0"}."""
        found = (BLOCK_PARAMETER.search(name) for name in graph)
        return {f"{match[1] or ''}transformer_blocks_{match[2]}" for match in found if match}


def test_a_whole_graph_mode_runs_its_transformer_as_one_graph_and_the_others_by_blocks() -> None:
    engine = create_flux2_engine(tiny=True, device="cpu", modes=("turbo", "flash"), compile=False)
    engine.load()
    frames = _as_tensor(_frame(7))
    modes = ("turbo", "flash")
    eager = {mode: engine.render_frames(frames, ["clay"], steps=2, seeds=[3], mode=mode) for mode in modes}
    recorder = _GraphRecorder()
    flash, turbo = engine._recipe("flash"), engine._recipe("turbo")
    engine.transformers.compile(scope="blocks", whole_graph_recipes=[flash], backend=recorder)
    every_block = {f"transformer_blocks_{i}" for i in range(TINY.transformer["num_layers"])} | {
        f"single_transformer_blocks_{i}" for i in range(TINY.transformer["num_single_layers"])
    }

    # flash: each distinct transformer call (the first step with the reference, the later ones without it)
    # is one graph that reads every block's weights: the blocks are traced inline.
    output = engine.render_frames(frames, ["clay"], steps=2, seeds=[3], mode="flash")
    assert torch.equal(output, eager["flash"])
    assert len(recorder.graphs) == 2
    assert all(recorder.blocks_in(graph) == every_block for graph in recorder.graphs)

    # turbo, on the same FP8 copy, goes through its blocks compiled one by one: one block's weights a graph.
    recorder.graphs.clear()
    output = engine.render_frames(frames, ["clay"], steps=2, seeds=[3], mode="turbo")
    assert torch.equal(output, eager["turbo"])
    assert recorder.graphs
    assert all(len(recorder.blocks_in(graph)) <= 1 for graph in recorder.graphs)
    assert engine.transformers.for_denoising(turbo) is engine.transformers.fp8


def test_only_the_whole_graph_modes_denoise_with_a_graph_of_their_own() -> None:
    engine = create_flux2_engine(tiny=True, device="cpu", modes=("exact", "turbo", "flash"), compile=True)
    engine.load()
    transformers = engine.transformers
    whole = transformers.for_denoising(engine._recipe("flash"))
    assert whole is not transformers.fp8
    assert whole._orig_mod is transformers.fp8  # the same weights, compiled as one graph
    assert transformers.for_denoising(engine._recipe("turbo")) is transformers.fp8
    assert transformers.for_denoising(engine._recipe("exact")) is transformers.exact
    # None named: every mode denoises through its blocks.
    engine = create_flux2_engine(
        tiny=True, device="cpu", modes=("flash",), compile=True, whole_graph_modes=()
    )
    engine.load()
    assert engine.transformers.for_denoising(engine._recipe("flash")) is engine.transformers.fp8
    with pytest.raises(ValueError, match="whole_graph_modes names unknown modes"):
        create_flux2_engine(tiny=True, device="cpu", whole_graph_modes=("fastest",))
