"""The flux2 engine's speed, next to a plain per-frame Flux2KleinPipeline call, in one process.

    python -m bench.gpu                         # klein-4B architecture, random weights, on CUDA
    python -m bench.gpu --sections cold-start   # only the cold start (a child process per run)
    python -m bench.gpu --tiny --device cpu     # the tiny configuration, for a smoke run

Sections (``--sections``, all by default), on one set of weights:

* ``baseline``: the pipeline called once per frame, ``Flux2KleinPipeline(image=<PIL frame>,
  prompt_embeds=<cached>, generator=<seeded>)`` returning a PIL image, eager and with the transformer
  compiled as one graph (what an integration without the engine's work does); and the engine's exact mode
  uncompiled (``render_frames`` must equal the pipeline bit for bit there).
* ``modes``: a fresh engine with the production options (every mode, compiled), its ``warm_up()`` timed,
  then each mode: ``render`` (JPEG bytes in and out, the cost the scheduler sees) at each step count and
  batch size, and ``render_frames``'s deviation from the eager pipeline (exact) on the same frame, prompt
  and seed. ``--levers`` adds single-approximation modes so each lever's effect is measured alone.
* ``style``: each mode with and without a style image (a second reference image of STYLE_IMAGE_SIZE²:
  1,024 more tokens at 512²), at the first step count, batch 1: ``render``'s ms/frame both ways, and
  ``render_frames``' deviation from the eager pipeline given ``image=[frame, style]``; with ``--levers``
  or ``--style-levers`` also the approximate modes with the style image read at 256² (``<mode>-style256``)
  and with its keys and values computed with every frame's instead of once per image
  (``<mode>-style-kv-per-frame``), each one more set of compiled shapes.
* ``lora``: exact and turbo with 0 (no LoRA support), 1 and 4 random rank-16 LoRA adapters loaded through
  the worker's path (``Flux2Config.loras``), ``render`` with none and with one active; overhead per frame
  against the engine without LoRA support (bench/lora.py).
* ``sessions``: 1, 2 and 4 concurrent sessions through the real scheduler (different prompts), each
  keeping its waiting frame fresh at 30 fps: aggregate and per-session FPS, fairness, latency.
* ``websocket``: the worker's real ``/ws`` on loopback, driven like the studio drives it (paced, as the
  worker's ``ready`` asks); with ``--levers`` also at camera rate and with per-message deflate on.
* ``replicas`` (only when named): 1 and 4 sessions on 1 engine replica and on one per visible CUDA device,
  through ``/ws`` (bench/replicas.py): delivered FPS, p50/p95 latency, fairness, against issue #19's targets.
* ``cold-start``: the pipeline saved with ``save_pretrained``, then a new process: imports,
  ``from_pretrained``, warm-up, first frame; with an empty and with a warm compile cache.

Timing: each call is bracketed by device synchronisation and timed with a host clock after warm-up calls;
the table shows medians. The record (environment, arguments, every row with its percentiles, the system
sections' results) is written as JSON under ``--out``.

Unless ``--model`` names a checkpoint, the weights are random: the timings
are those of the real architecture and sizes, the images are noise.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from bench.deviation import deviation
from bench.loadgen import PROMPTS
from bench.lora import format_lora_summary, measure_lora
from bench.replicas import replicas_section
from bench.system import COLD_START_RUNS
from bench.timeline import format_timeline, write_pass_timeline
from inference.engines.base import FrameJob
from inference.engines.flux2 import DEFAULT_MODEL, MODE_RECIPES, Flux2Config, Flux2Engine, ModeRecipe
from inference.engines.flux2.compiled import COMPILE_SCOPES
from inference.engines.flux2.decoders import random_decoder, save_decoder
from inference.engines.flux2.klein_config import (
    KLEIN_4B,
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_OUT_LAYERS,
    TINY,
    build_random_components,
)
from inference.engines.flux2.prompts import PromptEncoder
from inference.protocol import MAX_CLIENT_FPS, OUTPUT_SIZE
from inference.style_image import StyleImage, style_image_from_pixels

# Modes measured one approximation at a time (--levers), next to the production modes they make up.
LEVER_MODES: dict[str, ModeRecipe] = {
    "lever-text128": ModeRecipe(text_tokens=128),
    "lever-fp8": ModeRecipe(fp8=True),
    "lever-fp8-text128": ModeRecipe(fp8=True, text_tokens=128),
    "lever-small-decoder": ModeRecipe(decoder="small"),
    "lever-tiny-decoder": ModeRecipe(decoder="tiny"),
}
SECTIONS = ("baseline", "modes", "style", "lora", "sessions", "websocket", "replicas", "cold-start")
# The style section's levers: an approximate mode with its style image read at 256² (256 tokens, not
# 1,024), and with its keys and values computed with each frame's (the per-frame K/V scheme).
STYLE_LEVER_SIZE = 256


@dataclass
class Row:
    """One measured case."""

    phase: str
    case: str
    steps: int | None
    batch: int
    times_ms: list[float] = field(repr=False)
    first_call_ms: float | None = None  # the first (warm-up) call: includes compilation in 'compiled'
    max_abs: float | None = None  # against the eager pipeline's output, pixels in [0, 1]
    psnr_db: float | None = None
    error: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else math.nan

    @property
    def per_frame_ms(self) -> float:
        return self.median_ms / self.batch

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        times = sorted(self.times_ms)
        data.update(
            median_ms=self.median_ms,
            per_frame_ms=self.per_frame_ms,
            fps=1000.0 / self.per_frame_ms if self.times_ms else None,
            p10_ms=times[int(0.1 * (len(times) - 1))] if times else None,
            p90_ms=times[int(0.9 * (len(times) - 1))] if times else None,
            min_ms=times[0] if times else None,
        )
        return data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any], *, device: torch.device, warmup: int, iters: int
) -> tuple[list[float], float | None]:
    """(milliseconds of each of ``iters`` calls, milliseconds of the first warm-up call)."""
    first = None
    for index in range(warmup):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if index == 0:
            first = 1000 * (time.perf_counter() - start)
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return times, first


def pipeline_prompt_embeds(
    text_encoder: Any, tokenizer: Any, prompt: str, device: torch.device
) -> torch.Tensor:
    """``prompt``'s embedding as Flux2KleinPipeline encodes it, through ``text_encoder`` whole."""
    return Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        prompt=prompt,
        device=device,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        hidden_states_layers=TEXT_ENCODER_OUT_LAYERS,
    )


def webcam_frame(seed: int) -> np.ndarray:
    """A smooth random 512² RGB frame (H, W, 3): structured like a photo, unlike white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(17, 17, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.BICUBIC))


def to_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class Bench:
    """The cases of one run; each ``measure_*`` appends rows (or system results) to the record."""

    def __init__(self, base: Flux2Engine, args: argparse.Namespace) -> None:
        self.base = base  # uncompiled, exact only: the eager pipeline and its references
        self.args = args
        self.pipe = base.load()
        self.device = base.device
        self.rows: list[Row] = []
        self.system: dict[str, Any] = {}
        self.engine: Flux2Engine | None = None  # the production engine, built by measure_modes
        self.frames = [webcam_frame(seed) for seed in range(max(args.batch))]
        self.jpegs = [to_jpeg(frame) for frame in self.frames]
        self.frame_image = Image.fromarray(self.frames[0])  # the baseline's input, decoded once
        self.frame_tensor = torch.from_numpy(self.frames[0].copy()).permute(2, 0, 1)[None].to(self.device)
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(max(args.batch))]
        self.seeds = list(range(1, max(args.batch) + 1))
        # The eager pipeline's output per step count: what every row's deviation is measured against.
        self.references: dict[int, torch.Tensor] = {}
        # The style section's picture, and the eager pipeline's output with it as the second reference.
        self.style: StyleImage = style_image_from_pixels(webcam_frame(1_000))
        self.style_references: dict[int, torch.Tensor] = {}
        # The lora section's engines each adapt their own copy of the transformer, taken before any other
        # engine compiles or quantizes the shared one (kept in host memory until then).
        self.lora_transformer: torch.nn.Module | None = (
            copy.deepcopy(self.pipe.transformer).to("cpu") if "lora" in args.sections else None
        )

    def _run(self, phase: str, case: str, steps: int | None, batch: int, fn: Callable[[], Any]) -> Row:
        warmup = self.args.warmup + (1 if phase != "eager" else 0)
        try:
            times, first = time_calls(fn, device=self.device, warmup=warmup, iters=self.args.iters)
            row = Row(phase, case, steps, batch, times, first)
        except Exception as error:  # a failing case must not cost the rest of the run's measurements
            row = Row(phase, case, steps, batch, [], error=f"{type(error).__name__}: {error}")
        self.rows.append(row)
        print(f"  {phase:18s} {case:14s} steps={steps} batch={batch}: {row.median_ms:8.2f} ms", flush=True)
        return row

    def compute_references(self) -> None:
        """The eager pipeline's output for each step count, before anything is compiled or approximated."""
        for steps in self.args.steps:
            self.references[steps] = self.baseline_call(steps, "pt")
            if "style" in self.args.sections:
                self.style_references[steps] = self.baseline_call(steps, "pt", style=self.style)

    def baseline_call(
        self,
        steps: int,
        output_type: str = "pil",
        style: StyleImage | None = None,
        pipe: Flux2KleinPipeline | None = None,
    ) -> Any:
        """The baseline's per-frame call: PIL frame in, cached prompt embeddings, a seeded generator; with
        ``style``, the style image as the second reference image; through ``pipe`` instead of the bench's
        own pipeline when given (another transformer on the same components)."""
        return (pipe or self.pipe)(
            image=self.frame_image if style is None else [self.frame_image, style.image],
            prompt_embeds=self.base.prompt_embeds(self.prompts[0]),
            num_inference_steps=steps,
            guidance_scale=1.0,
            height=OUTPUT_SIZE,
            width=OUTPUT_SIZE,
            generator=torch.Generator(device=self.device).manual_seed(self.seeds[0]),
            output_type=output_type,
        ).images

    # ---- section: baseline

    def measure_baseline(self) -> None:
        """The per-frame pipeline call eager and compiled, and the uncompiled engine's exactness."""
        print("section baseline", flush=True)
        transformer = self.pipe.transformer
        for phase in ("eager", "compiled"):
            if phase == "compiled":
                # The plain way to compile it: the whole transformer as one graph, the VAE eager.
                transformer.compile(fullgraph=True, backend=self.args.baseline_compile_backend)
            for steps in self.args.steps:
                row = self._run(phase, "baseline", steps, 1, lambda steps=steps: self.baseline_call(steps))
                if row.error is None:
                    row.max_abs, row.psnr_db = deviation(
                        self.baseline_call(steps, "pt"), self.references[steps]
                    )
                if phase == "eager":
                    self.measure_render_frames(self.base, phase, "exact", steps)
        # Undone, so the production engine compiles the same module its own way (block by block).
        transformer._compiled_call_impl = None
        if self.args.components:
            self.measure_components("eager")

    def measure_render_frames(self, engine: Flux2Engine, phase: str, mode: str, steps: int) -> Row:
        prompt, seed = self.prompts[0], self.seeds[0]

        def call() -> torch.Tensor:
            return engine.render_frames(self.frame_tensor, [prompt], steps=steps, seeds=[seed], mode=mode)

        row = self._run(phase, "render_frames", steps, 1, call)
        if row.error is None:
            row.max_abs, row.psnr_db = deviation(call(), self.references[steps])
        return row

    # ---- section: modes

    def production_engine(self) -> Flux2Engine:
        """The engine as the worker runs it (every built-in mode, compiled), on the same weights; built and
        warmed up once, its warm-up timed."""
        if self.engine is None:
            config = Flux2Config(
                max_batch=max(self.args.batch),
                steps=self.args.steps[0],
                compile=self.args.compile,
                compile_scope=self.args.compile_scope,
                whole_graph_modes=tuple(self.args.whole_graph_modes),
                cuda_graphs=self.args.cuda_graphs,
                modes=tuple(self.args.modes),
                custom_modes={
                    **(LEVER_MODES if self.args.levers else {}),
                    **self.style_lever_modes(),
                },
                # The pipeline is given; these say where the modes' smaller decoders come from: random
                # weights for random model weights, else the published repos or the paths given.
                random_weights=self.base.config.random_weights,
                tiny=self.base.config.tiny,
                small_decoder=self.args.small_decoder,
                tiny_decoder=self.args.tiny_decoder,
                cache_dir=self.args.cache_dir,
            )
            start = time.perf_counter()
            engine = Flux2Engine(config, pipeline=self.pipe)
            engine.warm_up()
            warm_up_ms = 1000 * (time.perf_counter() - start)
            self.rows.append(Row("engine", "warm_up", config.steps, 1, [warm_up_ms]))
            # What the worker runs while idle once it is ready: the other modes' compilation.
            start = time.perf_counter()
            for task in engine.deferred_warm_ups():
                task()
            deferred_ms = 1000 * (time.perf_counter() - start)
            others = len(engine.modes) - 1
            if others:
                self.rows.append(Row("engine", "warm_up_rest", config.steps, others, [deferred_ms]))
            print(
                f"  warm_up (default mode): {warm_up_ms / 1000:.1f} s; the other {others}:"
                f" {deferred_ms / 1000:.1f} s",
                flush=True,
            )
            self.engine = engine
        return self.engine

    def style_lever_modes(self) -> dict[str, ModeRecipe]:
        """The style section's lever modes when it measures them (each one more set of compiled shapes):
        the approximate production modes with the style image read at STYLE_LEVER_SIZE², and those with
        style_kv_once with the style image's keys and values computed per frame instead."""
        levers: dict[str, ModeRecipe] = {}
        if not ((self.args.levers or self.args.style_levers) and "style" in self.args.sections):
            return levers
        for mode in self.args.modes:
            label, recipe = MODE_RECIPES[mode]
            if not label.approximate:
                continue
            levers[f"{mode}-style{STYLE_LEVER_SIZE}"] = replace(recipe, style_size=STYLE_LEVER_SIZE)
            if recipe.style_kv_once:
                levers[f"{mode}-style-kv-per-frame"] = replace(recipe, style_kv_once=False)
        return levers

    def measure_modes(self) -> None:
        print("section modes", flush=True)
        engine = self.production_engine()
        style_levers = self.style_lever_modes()
        for mode in engine.modes:
            if mode.id in style_levers:
                continue  # the same as its base mode without a style image; the style section has it
            phase = f"mode:{mode.id}"
            for steps in self.args.steps:
                self.measure_render_frames(engine, phase, mode.id, steps)
                for batch in self.args.batch:
                    jobs = [
                        FrameJob(
                            f"session-{i}", 0, self.jpegs[i], self.prompts[i], steps, self.seeds[i], mode.id
                        )
                        for i in range(batch)
                    ]
                    self._run(phase, "render", steps, batch, lambda jobs=jobs: engine.render(jobs))
        self.measure_new_prompts(engine)
        if engine.replays_graphs:
            self.measure_launched(engine)
        if self.args.components:
            self.measure_components("compiled")
        if self.args.profile:
            self.profile(engine)

    # ---- section: style

    def measure_style(self) -> None:
        """Each mode with and without a style image, at the first step count, one session."""
        print("section style", flush=True)
        engine = self.production_engine()
        steps, prompt, seed, style = self.args.steps[0], self.prompts[0], self.seeds[0], self.style
        levers = self.style_lever_modes()
        for mode in engine.modes:
            if mode.id in LEVER_MODES:
                continue
            phase = f"style:{mode.id}"
            plain = FrameJob("session-0", 0, self.jpegs[0], prompt, steps, seed, mode.id)
            styled = replace(plain, style=style)
            if mode.id not in levers:
                self._run(phase, "render", steps, 1, lambda job=plain: engine.render([job]))
            self._run(phase, "render+style", steps, 1, lambda job=styled: engine.render([job]))

            def call(mode: str = mode.id) -> torch.Tensor:
                return engine.render_frames(
                    self.frame_tensor, [prompt], steps=steps, seeds=[seed], mode=mode, styles=[style]
                )

            row = self._run(phase, "frames+style", steps, 1, call)
            if row.error is None:
                row.max_abs, row.psnr_db = deviation(call(), self.style_references[steps])

    def measure_new_prompts(self, engine: Flux2Engine) -> None:
        """A prompt new to the engine, another each call: ``prompt_embeds`` as the engine runs it (the text
        encoder cut to the layers the embedding reads, its pass replayed from a graph on CUDA), the same cut
        encoder launched kernel by kernel, and the pipeline's own encoding through a whole text encoder of
        the same architecture (with weights of its own: the engine's has been cut down)."""
        architecture = TINY if self.base.config.tiny else KLEIN_4B
        whole = build_random_components(architecture, device=self.device, dtype=engine.dtype)["text_encoder"]
        pipe = engine.load()
        launched = PromptEncoder(pipe.text_encoder, pipe.tokenizer, self.device, graph=False)
        count = iter(range(1_000_000))

        def new_prompt() -> str:
            return f"{self.prompts[0]}, take {next(count)}"

        def pipeline_call() -> torch.Tensor:
            return pipeline_prompt_embeds(whole, pipe.tokenizer, new_prompt(), self.device)

        with torch.no_grad():
            self._run("new prompt", "pipeline", None, 1, pipeline_call)
            self._run("new prompt", "launched", None, 1, lambda: launched(new_prompt()))
            self._run("new prompt", "prompt_embeds", None, 1, lambda: engine.prompt_embeds(new_prompt()))
            prompt = new_prompt()
            difference = (engine.prompt_embeds(prompt).float() - launched(prompt).float()).abs().max().item()
        self.system["new_prompt_replayed_vs_launched_max_abs"] = difference
        print(f"  a new prompt replayed vs launched, max |difference|: {difference}", flush=True)

    def measure_launched(self, engine: Flux2Engine) -> None:
        """The CUDA-graph lever and its gate: each mode with its kernels launched one by one instead of
        replayed, and the largest difference between the two outputs (rounding-level at most: a replay runs
        the compiled kernels, though libraries may pick other algorithms inside a capture)."""
        steps, prompt, seed = self.args.steps[0], self.prompts[0], self.seeds[0]
        identical: dict[str, float] = {}
        for mode in engine.modes:
            call = partial(engine.render_frames, self.frame_tensor, [prompt], steps=steps, seeds=[seed])
            replayed = call(mode=mode.id)
            engine.cuda_graphs = False
            try:
                launched = call(mode=mode.id)
                identical[mode.id] = deviation(replayed, launched)[0]
                self.measure_render_frames(engine, f"launched:{mode.id}", mode.id, steps)
                job = FrameJob("session-0", 0, self.jpegs[0], prompt, steps, seed, mode.id)
                self._run(f"launched:{mode.id}", "render", steps, 1, lambda job=job: engine.render([job]))
            finally:
                engine.cuda_graphs = True
        self.system["cuda_graphs_vs_launched_max_abs"] = identical
        print(f"  CUDA graph replay vs launched kernels, max |difference|: {identical}", flush=True)

    def measure_components(self, phase: str) -> None:
        pipe, device = self.pipe, self.device
        transformer, vae = pipe.transformer, pipe.vae
        config = transformer.config
        dtype = transformer.dtype
        tokens = (OUTPUT_SIZE // (pipe.vae_scale_factor * 2)) ** 2
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

        prompt_embeds = self.base.prompt_embeds(self.prompts[0])
        hidden_states = randn(1, 2 * tokens, config.in_channels)
        text_ids = pipe._prepare_text_ids(prompt_embeds).to(device)
        img_ids = torch.cat([self.base._latent_ids, self.base._reference_latent_ids(OUTPUT_SIZE)], dim=1)
        timestep = torch.full((1,), 0.5, device=device, dtype=dtype)
        image = randn(1, 3, OUTPUT_SIZE, OUTPUT_SIZE, dtype=vae.dtype).clamp(-1, 1)
        image = image.contiguous(memory_format=torch.channels_last)
        latent_size = OUTPUT_SIZE // pipe.vae_scale_factor
        latents = randn(1, vae.config.latent_channels, latent_size, latent_size)

        with torch.no_grad():
            self._run(
                phase,
                "transformer",
                None,
                1,
                lambda: transformer(
                    hidden_states=hidden_states,
                    timestep=timestep,
                    guidance=None,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=img_ids,
                    joint_attention_kwargs=None,
                    return_dict=False,
                ),
            )
            self._run(
                phase, "vae.encode", None, 1, lambda: pipe._encode_vae_image(image=image, generator=None)
            )
            self._run(phase, "vae.decode", None, 1, lambda: vae.decode(latents, return_dict=False))
            # The smaller decoders of the production engine's modes, on the latent form they take (the
            # normalised, patchified one): what each saves against vae.decode above.
            decoders = self.engine.decoders if self.engine is not None and phase == "compiled" else {}
            patched = randn(1, 4 * vae.config.latent_channels, latent_size // 2, latent_size // 2)
            for name, decoder in decoders.items():
                self._run(phase, f"decoder:{name}", None, 1, lambda decoder=decoder: decoder(patched))
            if phase == "eager":
                self._run(
                    phase,
                    "text_encoder",
                    None,
                    1,
                    lambda: pipeline_prompt_embeds(
                        pipe.text_encoder, pipe.tokenizer, self.prompts[1], device
                    ),
                )

    def profile(self, engine: Flux2Engine) -> None:
        """Write the device-time breakdown of one 2-step render per mode, by operator."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        for mode in engine.modes:
            with profile(activities=activities) as profiler:
                engine.render_frames(self.frame_tensor, [self.prompts[0]], steps=2, seeds=[1], mode=mode.id)
                _sync(self.device)
            sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70)
            path = Path(self.args.out) / f"profile-{mode.id}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table)
            print(f"  profile of one 2-step {mode.id} render written to {path}")
            # Where the device sits idle in the pass (timeline-<mode>.json, trace-<mode>.json.gz beside it).
            timeline = write_pass_timeline(profiler, path.parent, mode.id)
            self.system.setdefault("profile_timelines", {})[mode.id] = timeline
            print("\n".join(format_timeline(timeline, f"one 2-step {mode.id} render")), flush=True)

    # ---- sections: sessions, websocket, cold start

    def measure_system(self, section: str) -> None:
        from bench import system as system_bench

        print(f"section {section}", flush=True)
        args = self.args
        if section == "cold-start":
            options = {
                "compile": args.compile,
                "compile_scope": args.compile_scope,
                "whole_graph_modes": list(args.whole_graph_modes),
                "cuda_graphs": args.cuda_graphs,
                "modes": list(args.modes),
                "max_batch": max(args.batch),
                "steps": args.steps[0],
            }
            if args.dtype:
                options["dtype"] = args.dtype
            if args.device:
                options["device"] = args.device
            if not args.cold_start_deferred:
                options["deferred_warm_ups"] = False
            workdir = Path(args.cold_start_dir)
            # The child loads a saved checkpoint, not random weights: the smaller decoders its modes use are
            # saved beside it (random weights, the published formats) unless paths were given.
            used = {MODE_RECIPES[mode][1].decoder for mode in args.modes} - {"full"}
            base = self.base
            for name in sorted(used):
                given = args.small_decoder if name == "small" else args.tiny_decoder
                if given is None:
                    module = random_decoder(name, self.pipe.vae, base._bn_mean, base._bn_std, seed=0)
                    given = str(save_decoder(module, workdir / f"{name}-decoder"))
                options[f"{name}_decoder"] = given

            def keep(record: dict[str, Any]) -> None:
                # The runs so far, so a run cut by its time limit keeps the starts that finished.
                self.system["cold_start"] = record
                run = record["runs"][-1]
                total = "ERROR" if run["error"] else f"{run['total_s']:.1f} s"
                print(f"  cold start {len(record['runs'])} ({run['cache']}): {total}", flush=True)

            self.system["cold_start"] = system_bench.measure_cold_start(
                self.pipe,
                workdir=workdir,
                engine_options=options,
                runs=tuple(args.cold_start_runs),
                on_run=keep,
            )
            return
        engine = self.production_engine()
        steps = args.steps[0]
        results = []
        for mode in args.system_modes or [engine.modes[0].id]:
            for max_batch in sorted(set(args.system_max_batch)):
                engine.max_batch = max_batch  # the scheduler reads it per batch
                if section == "sessions":
                    result = system_bench.measure_sessions(
                        engine, sessions=tuple(args.sessions), seconds=args.seconds, mode=mode, steps=steps
                    )
                else:
                    result = system_bench.measure_websocket(
                        engine,
                        sessions=tuple(args.sessions),
                        seconds=args.seconds,
                        fps=args.camera_fps,
                        mode=mode,
                        steps=steps,
                        levers=args.levers,
                    )
                results.append({"mode": mode, "max_batch": max_batch, **result})
        engine.max_batch = max(args.batch)
        self.system[section] = results


def environment(engine: Flux2Engine) -> dict[str, Any]:
    import diffusers
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(engine.device),
        "dtype": str(engine.dtype),
        "model": engine.model,
        "random_weights": engine.config.random_weights or engine.config.tiny,
    }
    if engine.device.type == "cuda":
        properties = torch.cuda.get_device_properties(engine.device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            max_memory_allocated_gib=round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 2),
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        info["git_commit"] = commit.stdout.strip()
        # A copy of a working tree (a GPU machine's) can run code that differs from its .git's HEAD.
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        changes = subprocess.run(status, capture_output=True, text=True, check=True)
        info["git_tracked_changes"] = bool(changes.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'phase':18s} {'case':14s} {'steps':>5s} {'batch':>5s} {'median ms':>10s} {'ms/frame':>9s} "
        f"{'fps':>7s} {'first ms':>9s} {'max_abs':>8s} {'PSNR dB':>8s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.error:
            lines.append(
                f"{row.phase:18s} {row.case:14s} {row.steps or '':>5} {row.batch:5d}  ERROR {row.error}"
            )
            continue
        fps = 1000.0 / row.per_frame_ms
        first = f"{row.first_call_ms:9.1f}" if row.first_call_ms is not None else f"{'':9s}"
        max_abs = f"{row.max_abs:8.1e}" if row.max_abs is not None else f"{'':8s}"
        psnr = f"{row.psnr_db:8.1f}" if row.psnr_db is not None else f"{'':8s}"
        lines.append(
            f"{row.phase:18s} {row.case:14s} {row.steps or '':>5} {row.batch:5d} {row.median_ms:10.2f} "
            f"{row.per_frame_ms:9.2f} {fps:7.1f} {first} {max_abs} {psnr}"
        )
    return "\n".join(lines)


def _find(rows: Sequence[Row], phase: str, case: str, steps: int, batch: int = 1) -> Row | None:
    for row in rows:
        if (row.phase, row.case, row.steps, row.batch) == (phase, case, steps, batch) and not row.error:
            return row
    return None


# Issue #18's per-frame targets: 512², 2 steps, batch 1, JPEG in and out (the modes section's render rows).
TARGET_FASTEST_FPS = 40.0
TARGET_EXACT_FPS = 15.0


def format_frame_targets(rows: Sequence[Row], steps: int = 2) -> list[str]:
    """The fastest labelled (built-in, approximate) mode and exact against their targets."""
    renders = {
        row.phase.removeprefix("mode:"): row
        for row in rows
        if row.phase.startswith("mode:") and row.case == "render" and row.steps == steps and row.batch == 1
        if not row.error
    }
    labelled = [mode for mode in renders if mode in MODE_RECIPES and MODE_RECIPES[mode][1].approximate]
    lines = []
    if labelled:
        fastest = min(labelled, key=lambda mode: renders[mode].per_frame_ms)
        fps = 1000 / renders[fastest].per_frame_ms
        verdict = "meets" if fps >= TARGET_FASTEST_FPS else "misses"
        lines.append(
            f"target: fastest labelled mode {fastest} {fps:.1f} FPS, {verdict} >= {TARGET_FASTEST_FPS:g}"
        )
    if "exact" in renders:
        fps = 1000 / renders["exact"].per_frame_ms
        verdict = "meets" if fps >= TARGET_EXACT_FPS else "misses"
        lines.append(f"target: exact {fps:.1f} FPS, {verdict} >= {TARGET_EXACT_FPS:g}")
    return lines


def format_summary(rows: Sequence[Row], system: dict[str, Any]) -> str:
    """The per-frame targets (docs/performance.md, "Targets") as measured in this run, then the system
    sections' own tables."""
    lines = []
    for steps in sorted({row.steps for row in rows if row.steps}):
        baseline = _find(rows, "compiled", "baseline", steps)
        if baseline is None:
            continue
        lines.append(f"{steps} steps: compiled pipeline baseline {baseline.per_frame_ms:.2f} ms/frame")
        for row in rows:
            if (
                row.phase.startswith("mode:")
                and row.case == "render"
                and row.steps == steps
                and not row.error
            ):
                ratio = baseline.per_frame_ms / row.per_frame_ms
                mode = row.phase.removeprefix("mode:")
                lines.append(
                    f"  {mode:18s} batch {row.batch}: {row.per_frame_ms:7.2f} ms/frame"
                    f" {1000 / row.per_frame_ms:6.1f} FPS  {ratio:5.2f}x baseline"
                )
    lines.extend(format_frame_targets(rows))
    style_rows = [row for row in rows if row.phase.startswith("style:") and row.case.startswith("render")]
    if style_rows:
        lines.append("")
        lines.append("style image (render, batch 1): ms/frame and FPS without -> with")
    for row in style_rows:
        if row.case != "render+style" or row.error:
            continue
        mode = row.phase.removeprefix("style:")
        plain = _find(rows, row.phase, "render", row.steps or 0)
        without = f"{plain.per_frame_ms:7.2f} ms {1000 / plain.per_frame_ms:6.1f} FPS -> " if plain else ""
        lines.append(
            f"  {mode:18s} {row.steps} steps: {without}{row.per_frame_ms:7.2f} ms"
            f" {1000 / row.per_frame_ms:6.1f} FPS"
        )
    lines.extend(format_lora_summary(rows))
    for section in ("sessions", "websocket"):
        for result in system.get(section, []):
            lines.append("")
            lines.append(
                f"{section}: mode {result.get('mode')}, scheduler max_batch {result.get('max_batch')}"
            )
            lines.extend(result.get("table", []))
    if "replicas" in system:
        lines.extend(["", *system["replicas"]["table"]])
    if "cold_start" in system:
        lines.append("")
        lines.extend(system["cold_start"].get("table", []))
        lines.extend(system["cold_start"].get("notes", []))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help=f"checkpoint to load (default: random weights; {DEFAULT_MODEL})"
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--small-decoder", default=None, help="FLUX.2-small-decoder repo id or path")
    parser.add_argument("--tiny-decoder", default=None, help="TAEF2 repo id or path")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configuration")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    default_sections = [section for section in SECTIONS if section != "replicas"]  # a worker per device
    parser.add_argument("--sections", nargs="+", default=default_sections, choices=SECTIONS)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4], help="the first is the default")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="render() batch sizes")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--modes", nargs="+", default=list(MODE_RECIPES), choices=list(MODE_RECIPES), help="production modes"
    )
    parser.add_argument("--levers", action="store_true", help="also one mode per single approximation")
    parser.add_argument(
        "--style-levers", action="store_true", help="the style section's lever modes alone (without --levers)"
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA yes"
    )
    parser.add_argument("--compile-scope", default="blocks", choices=COMPILE_SCOPES)
    parser.add_argument(
        "--baseline-compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled baseline (a smoke run on a CPU can take 'aot_eager', "
        "which traces the same graph without generating kernels)",
    )
    parser.add_argument(
        "--whole-graph-modes",
        nargs="*",
        default=list(Flux2Config.whole_graph_modes),
        help="modes whose transformer is also compiled as one graph (none given: every mode by blocks)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay each frame as a CUDA graph (default: when compiled on CUDA)",
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4], help="concurrent sessions")
    parser.add_argument(
        "--camera-fps",
        type=float,
        default=float(MAX_CLIENT_FPS),
        help="the websocket clients' camera: the fastest a client may send, so that one session of a mode "
        "faster than 30 FPS can get all of it",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per sessions/websocket case")
    parser.add_argument(
        "--system-modes",
        nargs="*",
        default=None,
        help="modes of the sessions/websocket cases (default: exact)",
    )
    parser.add_argument(
        "--system-max-batch", type=int, nargs="+", default=[1], help="scheduler batch limits to compare"
    )
    parser.add_argument(
        "--cold-start-dir",
        default=str(Path(tempfile.gettempdir()) / "stylecast-cold-start"),
        help="where the checkpoint and the compile caches of the cold-start section go (local disk)",
    )
    parser.add_argument(
        "--cold-start-runs",
        nargs="+",
        choices=COLD_START_RUNS,
        default=["empty", "warm"],
        help="the cold starts to run, in order: 'empty' empties the compile caches first, 'warm' reuses them "
        "(warm twice shows how much a start varies)",
    )
    parser.add_argument(
        "--no-cold-start-deferred",
        dest="cold_start_deferred",
        action="store_false",
        help="end each cold start at its first frame, without the deferred warm-ups of the other modes "
        "(their time is then not reported; the first frame never waits for them)",
    )
    parser.add_argument("--no-components", dest="components", action="store_false")
    parser.add_argument("--profile", action="store_true", help="write a per-operator profile of each mode")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON record")
    args = parser.parse_args(argv)
    if 1 not in args.batch:
        args.batch = [1, *args.batch]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = Flux2Engine(
        Flux2Config(
            model=args.model or DEFAULT_MODEL,
            cache_dir=args.cache_dir,
            device=args.device,
            dtype=args.dtype,
            random_weights=args.model is None and not args.tiny,
            tiny=args.tiny,
            max_batch=max(args.batch),
            modes=("exact",),
            compile=False,
        )
    )
    start = time.perf_counter()
    bench = Bench(base, args)
    load_s = time.perf_counter() - start
    print(f"{base.model} on {base.device} ({base.dtype}): loaded in {load_s:.1f}s", flush=True)
    bench.compute_references()
    started = datetime.now(UTC)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tiny" if args.tiny else ("random-klein-4B" if args.model is None else Path(args.model).name)

    def save(cut: str | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv),
            "load_s": round(load_s, 2),
            "environment": environment(base),
            "modes": [
                {"id": mode.id, "approximate": mode.approximate, "detail": mode.detail}
                for mode in (bench.engine.modes if bench.engine else base.modes)
            ],
            "rows": [row.record() for row in bench.rows],
            **bench.system,
        }
        if cut is not None:
            record["cut"] = cut
        device_tag = record["environment"].get("gpu", base.device.type).replace(" ", "-")
        path = out / f"{started:%Y%m%dT%H%M%S}-{name}-{device_tag}.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        record["path"] = str(path)
        return record

    # A time limit ends the run with SIGTERM (`timeout`); what was measured until then is still written.
    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    record: dict[str, Any] = {}
    section = ""
    try:
        for section in [section for section in SECTIONS if section in args.sections]:
            if section == "baseline":
                bench.measure_baseline()
            elif section == "modes":
                bench.measure_modes()
            elif section == "style":
                bench.measure_style()
            elif section == "lora":
                measure_lora(bench)
            elif section == "replicas":
                bench.system["replicas"] = replicas_section(args)
            else:
                bench.measure_system(section)
            # Rewritten after every section, so a run cut short still leaves what it measured.
            record = save()
    except _Terminated:
        record = save(cut=f"terminated in section {section}")
        print(f"\nterminated in section {section}; wrote what was measured to {record['path']}", flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_handler)

    env = record["environment"]
    print(f"\nwrote {record['path']}")
    print(
        f"{env['model']} | {env.get('gpu', env.get('cpu'))} | torch {env['torch']}"
        f" | diffusers {env['diffusers']} | {env['dtype']} | iters {args.iters}, medians"
    )
    print(format_table(bench.rows))
    summary = format_summary(bench.rows, bench.system)
    if summary:
        print(summary)
    return record


class _Terminated(BaseException):
    """SIGTERM arrived (a time limit ran out). Not an Exception: the cases' own error handling must not
    record it as a failed case and go on."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


if __name__ == "__main__":
    main()
