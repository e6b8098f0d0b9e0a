"""LoRA adapters on the tiny klein model: tiny random adapters written in diffusers' format, loaded through
diffusers' own loader, served per batch row by the engine and compared with the diffusers pipeline."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors.torch import save_file

from bench.lora import BLOCK_LINEARS, SINGLE_LINEARS
from inference.adapters import AdapterSpec
from inference.engines.base import FrameJob
from inference.engines.flux2 import Flux2Engine, create_flux2_engine
from inference.engines.flux2.klein_config import TINY, build_random_components
from inference.engines.flux2.lora import LoraLoadError, MultiLoraLinear, load_adapters
from inference.protocol import OUTPUT_SIZE, STYLE_IMAGE_SIZE
from inference.style_image import StyleImage, style_image_from_pixels
from tests.inference.engines.flux2.test_engine import pipeline_output

BATCH_TOLERANCE = 1e-3  # as test_engine.py: batched products sum in another order
# Fused (W + s B A) against unfused (W x + s B (A x)) products: float32 rounding, far below a pixel level.
FUSED_TOLERANCE = 1e-4


def write_lora(directory: Path, name: str, *, seed: int, rank: int = 4, alpha: float = 8.0) -> Path:
    """A random LoRA for the tiny transformer's block linears, saved as diffusers saves one."""
    transformer = build_random_components(TINY, device="cpu", dtype=torch.float32, seed=0)["transformer"]
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    targets = [f"transformer_blocks.0.{n}" for n in BLOCK_LINEARS]
    targets += [f"single_transformer_blocks.0.{n}" for n in SINGLE_LINEARS]
    modules = dict(transformer.named_modules())
    for target in targets:
        linear = modules[target]
        layers[f"{target}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.3
        layers[f"{target}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.3
    Flux2KleinPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=layers,
        weight_name=f"{name}.safetensors",
        transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": targets},
    )
    return directory / f"{name}.safetensors"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("loras")
    return {
        "clay": write_lora(directory, "clay", seed=1),
        "ink": write_lora(directory, "ink", seed=2, rank=8, alpha=4.0),
    }


@pytest.fixture(scope="module")
def engine(lora_files: dict[str, Path]) -> Flux2Engine:
    specs = (
        AdapterSpec("clay", str(lora_files["clay"]), trigger="claymation"),
        AdapterSpec("ink", str(lora_files["ink"]), scale=0.5),
    )
    engine = create_flux2_engine(tiny=True, device="cpu", max_batch=4, loras=specs)
    engine.load()
    return engine


def _frame(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(OUTPUT_SIZE // 32 + 1, OUTPUT_SIZE // 32 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.BILINEAR))


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _diffusers_pipeline(lora_files: dict[str, Path]) -> Flux2KleinPipeline:
    """The same tiny weights (same seed) with both adapters loaded by diffusers itself."""
    components = build_random_components(TINY, device="cpu", dtype=torch.float32, seed=0)
    pipe = Flux2KleinPipeline(**components, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    for name, path in lora_files.items():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    return pipe


def _pipeline_output(pipe: Flux2KleinPipeline, frame: np.ndarray, prompt: str, seed: int) -> torch.Tensor:
    return pipeline_output(pipe, Image.fromarray(frame), prompt, steps=2, seed=seed)


def test_adapter_at_a_scale_matches_diffusers_set_adapters(
    engine: Flux2Engine, lora_files: dict[str, Path]
) -> None:
    """The exactness gate. A frame alone (one choice for the whole batch) is rendered with the adapter fused
    into the weights: bit-identical to diffusers' set_adapters + fuse_lora, and within rounding of
    set_adapters unfused."""
    pipe = _diffusers_pipeline(lora_files)
    frame = _frame(5)
    plain = engine.render_frames(_as_tensor(frame), ["a portrait"], steps=2, seeds=[11])
    for name, scale in [("clay", 1.0), ("clay", 0.35), ("ink", 1.7)]:
        pipe.set_adapters([name], [scale])
        unfused = _pipeline_output(pipe, frame, "a portrait", 11)
        fused_pipe = _diffusers_pipeline(lora_files)
        fused_pipe.set_adapters([name], [scale])
        fused_pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[name])
        fused = _pipeline_output(fused_pipe, frame, "a portrait", 11)
        ours = engine.render_frames(
            _as_tensor(frame), ["a portrait"], steps=2, seeds=[11], adapters=[name], adapter_scales=[scale]
        )
        assert torch.equal(ours, fused), (name, scale, (ours - fused).abs().max())
        assert (ours - unfused).abs().max() < FUSED_TOLERANCE
        assert (ours - plain).abs().max() > 0.02  # the adapter changed the picture
    # No adapter (or scale 0) is the engine without LoRA, exactly.
    pipe.disable_lora()
    assert torch.equal(plain, _pipeline_output(pipe, frame, "a portrait", 11))
    zero = engine.render_frames(
        _as_tensor(frame), ["a portrait"], steps=2, seeds=[11], adapters=["clay"], adapter_scales=[0.0]
    )
    assert torch.equal(zero, plain)


def test_rows_with_different_adapters_match_diffusers_set_adapters_row_by_row(
    engine: Flux2Engine, lora_files: dict[str, Path]
) -> None:
    """A batch whose rows differ runs the unfused branches, PEFT's own arithmetic: each row equals
    set_adapters with its adapter alone, to the rounding batching itself brings."""
    pipe = _diffusers_pipeline(lora_files)
    frame = _frame(6)
    batch = engine.render_frames(
        _as_tensor(frame).expand(2, -1, -1, -1),
        ["a portrait"] * 2,
        steps=2,
        seeds=[3, 3],
        adapters=["clay", "ink"],
        adapter_scales=[0.8, 1.2],
    )
    for row, (name, scale) in enumerate([("clay", 0.8), ("ink", 1.2)]):
        pipe.set_adapters([name], [scale])
        reference = _pipeline_output(pipe, frame, "a portrait", 3)
        assert (batch[row] - reference[0]).abs().max() < BATCH_TOLERANCE


def test_switching_fuses_in_place_and_never_drifts(engine: Flux2Engine) -> None:
    """Each switch re-fuses into the same storage (so compiled and captured graphs keep reading it) from the
    unfused weights (so going back and forth changes nothing)."""
    frame = _as_tensor(_frame(7))
    layer = engine.pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, MultiLoraLinear)
    storage = layer.base.weight.data_ptr()

    def render(adapter: str | None, scale: float | None = None) -> torch.Tensor:
        return engine.render_frames(
            frame, ["x"], steps=2, seeds=[1], adapters=[adapter], adapter_scales=[scale]
        )

    plain, clay = render(None), render("clay")
    unfused = layer.unfused_weight.clone()
    assert not torch.equal(layer.base.weight, unfused)  # clay is in the weight now
    for adapter, scale in [("ink", 1.5), ("clay", 0.2), (None, None), ("ink", None)]:
        render(adapter, scale)
        assert layer.base.weight.data_ptr() == storage
    assert torch.equal(render("clay"), clay)
    assert torch.equal(render(None), plain)
    assert torch.equal(layer.base.weight, unfused)
    # A mixed batch after a fused one computes on the unfused weights.
    engine.render_frames(
        frame.expand(2, -1, -1, -1), ["x"] * 2, steps=2, seeds=[1, 1], adapters=["clay", None]
    )
    assert torch.equal(layer.base.weight, unfused)


def _products(engine: Flux2Engine, frame: torch.Tensor, adapters: list[str | None]) -> int:
    """How many matrix products one render of these rows runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func in products:
                Count.count += 1
            return func(*args, **(kwargs or {}))

    rows = len(adapters)
    kwargs = {"adapters": adapters} if engine.adapters else {}

    def render() -> None:
        frames = frame.expand(rows, -1, -1, -1)
        engine.render_frames(frames, ["x"] * rows, steps=2, seeds=[1] * rows, **kwargs)

    render()  # loads the weights and encodes the prompt, outside the count
    with Count():
        render()
    return Count.count


def test_no_branch_work_unless_rows_differ(engine: Flux2Engine) -> None:
    """With no adapter, or one adapter for the whole batch, an engine with adapters loaded runs the same
    matrix products as one without LoRA support; only rows that differ pay for the low-rank branches."""
    without = create_flux2_engine(tiny=True, device="cpu", max_batch=4)
    frame = _as_tensor(_frame(8))
    baseline = _products(without, frame, [None, None])
    assert _products(engine, frame, [None, None]) == baseline
    assert _products(engine, frame, ["clay", "clay"]) == baseline
    assert _products(engine, frame, ["clay", None]) > baseline


def test_switching_adapters_compiles_nothing_after_warm_up(lora_files: dict[str, Path]) -> None:
    """The fused and the branched form are both traced at warm-up (the branched one only for batches that
    can hold two sessions); then no choice of adapters, scales or mixes traces a graph again."""
    from torch._dynamo.testing import CompileCounter

    specs = (AdapterSpec("clay", str(lora_files["clay"])), AdapterSpec("ink", str(lora_files["ink"])))
    engine = create_flux2_engine(tiny=True, device="cpu", max_batch=2, loras=specs, modes=("exact",))
    engine.load()
    counter = CompileCounter()
    torch._dynamo.reset()
    # The engine's own warm-up, with a tracing backend that counts graphs in place of inductor.
    engine.compile = True
    engine.transformers.exact.compile(backend=counter, fullgraph=True, dynamic=None)
    try:
        engine.warm_up_mode("exact")
        traced = counter.frame_count
        assert traced >= 3  # batch 1, batch 2, batch 2 with branches
        frame = _as_tensor(_frame(2))
        for adapters, scales in [
            (["clay"], [None]),
            (["ink"], [1.5]),
            ([None], [None]),
            (["clay", "ink"], [None, None]),
            (["ink", "ink"], [0.3, 0.3]),
            (["ink", None], [0.3, None]),
            ([None, None], [None, None]),
        ]:
            rows = len(adapters)
            engine.render_frames(
                frame.expand(rows, -1, -1, -1),
                ["x"] * rows,
                steps=2,
                seeds=[1] * rows,
                adapters=adapters,
                adapter_scales=scales,
            )
        assert counter.frame_count == traced
    finally:
        torch._dynamo.reset()


def test_two_sessions_with_different_adapters_share_one_batch(engine: Flux2Engine) -> None:
    frame = _as_tensor(_frame(9))
    choices: list[tuple[str | None, float | None]] = [("clay", None), ("ink", None), (None, None)]
    calls: list[int] = []
    hook = engine.pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        batch = engine.render_frames(
            frame.expand(3, -1, -1, -1),
            ["x"] * 3,
            steps=2,
            seeds=[5] * 3,
            adapters=[a for a, _ in choices],
            adapter_scales=[s for _, s in choices],
        )
    finally:
        hook.remove()
    assert calls == [3, 3]  # one batch of three rows per step
    singles = [
        engine.render_frames(frame, ["x"], steps=2, seeds=[5], adapters=[a], adapter_scales=[s])[0]
        for a, s in choices
    ]
    for row, single in enumerate(singles):
        own = (batch[row] - single).abs().max()
        assert own < BATCH_TOLERANCE
        for other_row, other in enumerate(singles):
            if other_row != row:  # no cross-talk: each row is its own adapter's picture
                assert (batch[row] - other).abs().max() > 5 * own + 1e-3
    # The adapter's default scale (ink: 0.5) is what a row without a scale gets.
    half = engine.render_frames(frame, ["x"], steps=2, seeds=[5], adapters=["ink"], adapter_scales=[0.5])
    assert torch.equal(half[0], singles[1])


def test_render_appends_trigger_words_and_rejects_unknown_adapters(engine: Flux2Engine) -> None:
    jpeg = _jpeg(_frame(3))
    job = FrameJob("s", 0, jpeg, "a portrait", 2, 1, adapter="clay")
    expected = engine.encode_jpegs(
        engine.render_frames(
            engine.decode_frames([jpeg]), ["a portrait, claymation"], steps=2, seeds=[1], adapters=["clay"]
        )
    )
    assert engine.render([job]) == expected
    assert [info.name for info in engine.adapters] == ["clay", "ink"]
    assert engine.adapters[0].trigger == "claymation"
    with pytest.raises(ValueError, match="unknown adapter 'watercolour'"):
        engine.render([FrameJob("s", 0, jpeg, "x", 2, 1, adapter="watercolour")])


def test_fast_modes_carry_the_adapter_too(engine: Flux2Engine) -> None:
    frame = _as_tensor(_frame(4))
    exact = engine.render_frames(frame, ["x"], steps=2, seeds=[2], adapters=["clay"])
    fast = engine.render_frames(frame, ["x"], steps=2, seeds=[2], mode="fast", adapters=["clay"])
    fast_plain = engine.render_frames(frame, ["x"], steps=2, seeds=[2], mode="fast")
    assert isinstance(engine.transformers.fp8.transformer_blocks[0].attn.to_qkv, MultiLoraLinear)
    assert (fast - exact).abs().mean() < (fast_plain - exact).abs().mean()


def test_a_file_that_is_not_a_lora_for_this_transformer_refuses_to_load(
    tmp_path: Path, lora_files: dict[str, Path]
) -> None:
    not_lora = tmp_path / "weights.safetensors"
    save_file({"transformer.proj_out.weight": torch.zeros(4, 4)}, not_lora)
    text_only = tmp_path / "text.safetensors"
    save_file(
        {
            "text_encoder.layer.lora_A.weight": torch.zeros(2, 4),
            "text_encoder.layer.lora_B.weight": torch.zeros(4, 2),
        },
        text_only,
    )
    wrong_shape = tmp_path / "big.safetensors"
    save_file(
        {
            "transformer.proj_out.lora_A.weight": torch.zeros(4, 999),
            "transformer.proj_out.lora_B.weight": torch.zeros(64, 4),
        },
        wrong_shape,
    )
    components = build_random_components(TINY, device="cpu", dtype=torch.float32, seed=0)
    pipe = Flux2KleinPipeline(**components, is_distilled=True)
    for bad in (not_lora, text_only, wrong_shape, tmp_path / "missing.safetensors"):
        specs = [AdapterSpec("clay", str(lora_files["clay"])), AdapterSpec("bad", str(bad))]
        with pytest.raises(LoraLoadError, match=f"'bad'.*{re.escape(bad.name)}"):
            load_adapters(pipe, specs)
        # All or nothing: the transformer is left without any adapter, the good one included.
        assert not getattr(pipe.transformer, "peft_config", None)
        assert not any("lora" in name for name, _ in pipe.transformer.named_modules())


def test_an_engine_with_a_bad_adapter_does_not_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.proj_out.weight": torch.zeros(4, 4)}, bad)
    engine = create_flux2_engine(tiny=True, device="cpu", loras=(AdapterSpec("bad", str(bad)),))
    with pytest.raises(LoraLoadError, match=r"bad\.safetensors"):
        engine.load()
    assert engine.transformers is None


def test_switching_adapters_mid_stream_on_one_socket(engine: Flux2Engine) -> None:
    from inference.protocol import Error, ErrorCode
    from tests.inference.helpers import StreamClient, new_ticket, running_worker, webcam_jpeg

    jpeg = webcam_jpeg()

    def expected(adapter: str | None, scale: float | None = None, prompt: str = "") -> bytes:
        return engine.render([FrameJob("x", 0, jpeg, prompt, 2, 0, adapter=adapter, adapter_scale=scale)])[0]

    with (
        running_worker(engine_factory=lambda: engine) as running,
        StreamClient.connect(running.ws_url) as client,
    ):
        ready = client.start(new_ticket())
        assert [(a.name, a.scale, a.trigger) for a in ready.adapters] == [
            ("clay", 1.0, "claymation"),
            ("ink", 0.5, ""),
        ]
        assert ready.adapter is None
        client.send_frame(1, jpeg)
        plain = client.frame(1).jpeg
        assert plain == expected(None)

        client.send_json('{"type": "params", "adapter": "clay"}')
        client.send_frame(2, jpeg)
        assert client.frame(2).jpeg == expected("clay")

        # A bad adapter or scale is refused as a whole; the session goes on with what it had.
        client.send_json('{"type": "params", "adapter": "watercolour", "prompt": "lost"}')
        assert client.error().code is ErrorCode.BAD_PARAMS
        client.send_json('{"type": "params", "adapter_scale": 2.5}')
        assert client.error().code is ErrorCode.BAD_PARAMS
        client.send_frame(3, jpeg)
        assert client.frame(3).jpeg == expected("clay")

        client.send_json('{"type": "params", "adapter": "ink", "adapter_scale": 1.5}')
        client.send_frame(4, jpeg)
        assert client.frame(4).jpeg == expected("ink", 1.5)
        # Omitting `adapter` keeps it; null turns it off.
        client.send_json('{"type": "params", "prompt": "sketch"}')
        client.send_frame(5, jpeg)
        assert client.frame(5).jpeg == expected("ink", 1.5, "sketch")
        client.send_json('{"type": "params", "adapter": null, "prompt": ""}')
        client.send_frame(6, jpeg)
        assert client.frame(6).jpeg == plain
        assert len(client.messages(Error)) == 2


def test_a_style_images_kept_keys_follow_the_rows_adapter(engine: Flux2Engine) -> None:
    """Under style_kv_once the style image's keys and values are computed by the adapted weights: a row
    that changes adapter gets them computed again, never the ones another adapter made."""
    stripes = (np.arange(STYLE_IMAGE_SIZE)[:, None] + np.arange(STYLE_IMAGE_SIZE)[None, :]) // 32 % 2
    pixels = np.array([[200, 30, 40], [20, 60, 220]], dtype=np.uint8)[stripes]
    style = style_image_from_pixels(pixels)
    frame = _as_tensor(_frame(31))

    def render(style_image: StyleImage, adapter: str | None) -> torch.Tensor:
        return engine.render_frames(
            frame, ["a portrait"], steps=2, seeds=[4], mode="fast", styles=[style_image], adapters=[adapter]
        )

    computed = engine.style_kv.computed
    with_clay = render(style, "clay")
    with_ink = render(style, "ink")
    assert engine.style_kv.computed == computed + 2  # one set per adapter
    # What a style image seen for the first time under ink renders: the kept keys are ink's own.
    assert torch.equal(with_ink, render(style_image_from_pixels(pixels), "ink"))
    assert torch.equal(with_clay, render(style, "clay"))  # and clay's are still clay's
    assert engine.style_kv.computed == computed + 3
