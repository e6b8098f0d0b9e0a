"""The bench's ``lora`` section: what serving LoRA adapters costs a frame.

Random rank-16 adapters on every attention and MLP linear of the transformer's blocks (what the LoRAs
people train for klein target) are written in diffusers' format (``Flux2KleinPipeline.save_lora_weights``)
to a temporary folder and loaded as the worker loads ``FLUX2_LORAS``: ``AdapterSpec``s in
``Flux2Config.loras``, read by the engine through diffusers' ``load_lora_weights``. Then, for exact and
turbo, one engine per adapter count (0: the engine without LoRA support, which wraps no layer; 1 and 4
loaded), each built as the production engine is (compiled, CUDA graphs where they are on) on its own copy
of the same transformer weights and warmed up for what is timed (batch 1: the fused form, lora.py), and
``render`` (JPEG in and out, batch 1) timed with no adapter active, with one active at scale 1, and, with
several loaded, switching adapter every frame (each frame re-fuses the weights). The exactness gate:
``frames+lora``, the engine's ``render_frames`` with the adapter, against the eager pipeline with the same
adapter loaded by diffusers (``load_lora_weights`` + ``set_adapters``, unfused) on the same weights, frame
and seed. The summary gives ms/frame and the overhead against the engine without LoRA support, in the
same run.
"""

from __future__ import annotations

import copy
import gc
import itertools
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from diffusers import Flux2KleinPipeline

from bench.deviation import deviation
from inference.adapters import AdapterSpec
from inference.engines.base import FrameJob
from inference.engines.flux2 import Flux2Config, Flux2Engine

if TYPE_CHECKING:
    from argparse import Namespace
    from collections.abc import Callable, Sequence


class Row(Protocol):
    """What the summary reads of one of bench.gpu's rows."""

    phase: str
    case: str
    error: str | None
    max_abs: float | None
    psnr_db: float | None

    @property
    def per_frame_ms(self) -> float: ...


class Bench(Protocol):
    """What this section uses of bench.gpu's Bench (a Protocol: bench.gpu imports this module)."""

    args: Namespace
    base: Flux2Engine
    pipe: Flux2KleinPipeline
    device: torch.device
    prompts: list[str]
    seeds: list[int]
    jpegs: list[bytes]
    lora_transformer: torch.nn.Module | None
    frame_tensor: torch.Tensor

    def _run(self, phase: str, case: str, steps: int | None, batch: int, fn: Callable[[], Any]) -> Any: ...

    def baseline_call(
        self, steps: int, output_type: str = ..., style: Any = ..., pipe: Flux2KleinPipeline | None = ...
    ) -> Any: ...


RANK = 16
ALPHA = 16.0
ADAPTER_COUNTS = (0, 1, 4)
LORA_MODES = ("exact", "turbo")
# The linears an adapter targets: in the double-stream blocks every attention projection and both MLPs,
# in the single-stream blocks the fused QKV+MLP input projection and the output projection.
BLOCK_LINEARS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)
SINGLE_LINEARS = ("attn.to_qkv_mlp_proj", "attn.to_out")


def adapter_targets(transformer: torch.nn.Module) -> list[str]:
    """The names of the linears of ``transformer``'s blocks that the bench's adapters adapt."""
    targets = []
    for name, module in transformer.named_modules():
        block, _, rest = name.partition(".")
        index, _, layer = rest.partition(".")
        linears = {"transformer_blocks": BLOCK_LINEARS, "single_transformer_blocks": SINGLE_LINEARS}.get(
            block
        )
        if linears and index.isdigit() and layer in linears and isinstance(module, torch.nn.Linear):
            targets.append(name)
    return targets


def write_random_adapters(
    transformer: torch.nn.Module, directory: Path, count: int, *, rank: int = RANK, seed: int = 0
) -> list[Path]:
    """``count`` random LoRAs for ``transformer``, saved as diffusers saves a trained one (bf16)."""
    modules = dict(transformer.named_modules())
    targets = adapter_targets(transformer)
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed + index)
        layers: dict[str, torch.Tensor] = {}
        for target in targets:
            linear = modules[target]
            assert isinstance(linear, torch.nn.Linear)
            # Small, as trained LoRA deltas are: the frame changes, the numbers stay in range.
            down = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=generator) * 0.02
            layers[f"{target}.lora_A.weight"] = down.to(torch.bfloat16)
            layers[f"{target}.lora_B.weight"] = up.to(torch.bfloat16)
        weight_name = f"bench{index}.safetensors"
        Flux2KleinPipeline.save_lora_weights(
            directory,
            transformer_lora_layers=layers,
            weight_name=weight_name,
            transformer_lora_adapter_metadata={"r": rank, "lora_alpha": ALPHA, "target_modules": targets},
        )
        paths.append(directory / weight_name)
    return paths


def measure_lora(bench: Bench) -> None:
    """Exact and turbo with 0, 1 and 4 adapters loaded, none and one active (see the module's docstring)."""
    print("section lora", flush=True)
    args = bench.args
    pristine = bench.lora_transformer
    assert pristine is not None, "the Bench keeps a copy of the transformer when the lora section runs"
    modes = tuple(mode for mode in LORA_MODES if mode in args.modes) or (args.modes[0],)
    steps = args.steps[0]
    with tempfile.TemporaryDirectory(prefix="stylecast-bench-lora-") as folder:
        paths = write_random_adapters(pristine, Path(folder), max(ADAPTER_COUNTS))
        specs = [AdapterSpec(f"lora{i}", str(path)) for i, path in enumerate(paths)]
        reference = _diffusers_reference(bench, paths[0])
        for count in ADAPTER_COUNTS:
            transformer = copy.deepcopy(pristine).to(bench.device)
            pipe = Flux2KleinPipeline(**{**bench.pipe.components, "transformer": transformer})
            config = Flux2Config(
                max_batch=1,
                steps=steps,
                compile=args.compile,
                compile_scope=args.compile_scope,
                cuda_graphs=args.cuda_graphs,
                modes=modes,
                loras=tuple(specs[:count]),
                random_weights=bench.base.config.random_weights,
                tiny=bench.base.config.tiny,
                small_decoder=args.small_decoder,
                tiny_decoder=args.tiny_decoder,
                cache_dir=args.cache_dir,
            )
            _measure_engine(bench, Flux2Engine(config, pipeline=pipe), count, modes, reference)
            del pipe, transformer
            gc.collect()
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()


def _diffusers_reference(bench: Bench, path: Path) -> torch.Tensor:
    """The eager pipeline's output with adapter ``path`` at scale 1, loaded and applied by diffusers itself
    (unfused), on a copy of the bench's transformer: what the engine's exact mode with it must match."""
    transformer = copy.deepcopy(bench.lora_transformer).to(bench.device)
    pipe = Flux2KleinPipeline(**{**bench.pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="lora0")
    pipe.set_adapters(["lora0"], [1.0])
    with torch.no_grad():
        images = bench.baseline_call(bench.args.steps[0], "pt", pipe=pipe)
    del pipe, transformer
    gc.collect()
    return images


def _measure_engine(
    bench: Bench, engine: Flux2Engine, count: int, modes: Sequence[str], reference: torch.Tensor
) -> None:
    """Warm ``engine`` up for what is timed (each mode at batch 1: what the worker warms first), then time
    each mode."""
    engine.warm_up()
    for mode in modes:
        engine.warm_up_mode(mode, batch_sizes=(1,))
    steps, prompt, seed = bench.args.steps[0], bench.prompts[0], bench.seeds[0]
    for mode in modes:
        phase = f"lora{count}:{mode}"
        plain = FrameJob("session-0", 0, bench.jpegs[0], prompt, steps, seed, mode)
        bench._run(phase, "render", steps, 1, lambda job=plain: engine.render([job]))
        if not count:
            continue
        active = replace(plain, adapter="lora0", adapter_scale=1.0)
        bench._run(phase, "render+lora", steps, 1, lambda job=active: engine.render([job]))
        if mode == "exact":

            def call(mode: str = mode) -> torch.Tensor:
                return engine.render_frames(
                    bench.frame_tensor, [prompt], steps=steps, seeds=[seed], mode=mode, adapters=["lora0"]
                )

            row = bench._run(phase, "frames+lora", steps, 1, call)
            if row.error is None:
                row.max_abs, row.psnr_db = deviation(call(), reference)
        if count > 1:
            # A different adapter every frame: each frame re-fuses the weights first (a style switch).
            turns = itertools.cycle([replace(plain, adapter=f"lora{i}", adapter_scale=1.0) for i in range(2)])
            bench._run(phase, "render+switch", steps, 1, lambda turns=turns: engine.render([next(turns)]))


def format_lora_summary(rows: Sequence[Row]) -> list[str]:
    """ms/frame of each case and its overhead against the same mode without LoRA support."""
    by_key: dict[tuple[str, str], Any] = {
        (row.phase, row.case): row for row in rows if row.phase.startswith("lora") and not row.error
    }
    if not by_key:
        return []
    lines = ["", "LoRA adapters (render, batch 1): ms/frame, overhead vs the same mode without LoRA support"]
    for mode in LORA_MODES:
        reference = by_key.get((f"lora0:{mode}", "render"))
        if reference is None:
            continue
        lines.append(f"  {mode:6s} no LoRA support        {reference.per_frame_ms:8.2f} ms")
        for count in ADAPTER_COUNTS[1:]:
            cases = (("render", "none active"), ("render+lora", "one active"), ("render+switch", "switching"))
            for case, label in cases:
                row = by_key.get((f"lora{count}:{mode}", case))
                if row is None:
                    continue
                overhead = 100 * (row.per_frame_ms / reference.per_frame_ms - 1)
                lines.append(
                    f"  {mode:6s} {count} loaded, {label:11s} {row.per_frame_ms:8.2f} ms {overhead:+6.1f} %"
                )
    for (phase, case), row in by_key.items():
        if case == "frames+lora" and row.max_abs is not None:
            lines.append(
                f"  {phase}: adapter lora0 vs diffusers' set_adapters (eager, unfused): max |difference|"
                f" {row.max_abs:.1e}, PSNR {row.psnr_db:.1f} dB"
            )
    return lines
