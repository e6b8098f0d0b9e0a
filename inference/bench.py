"""Per-frame latency of the flux2 engine, next to the seed product's way of calling Flux2KleinPipeline.

    python -m inference.bench                       # klein-4B architecture, random weights, on CUDA
    python -m inference.bench --tiny --device cpu   # the tiny configuration, for a smoke run

Everything runs in one process on one set of weights, so the rows are directly comparable:

* ``baseline``: what the seed product did per frame: ``Flux2KleinPipeline(image=<PIL frame>,
  prompt_embeds=<cached>, generator=<seeded>)`` returning a PIL image.
* ``render``: ``Flux2Engine.render``: JPEG bytes in, JPEG bytes out (decode, restyle, encode), the cost
  the scheduler sees per call; with ``batch`` > 1 the per-frame figure is the call's time over the batch.
* ``render_frames``: the engine's denoising pass alone, uint8 frame tensor in, float image out.
* ``transformer``, ``vae.encode``, ``vae.decode``, ``text_encoder``: one call of each component at the
  engine's shapes (1024 noise + 1024 reference + 512 text tokens; 512² frames; a 512-token prompt).

Phases (``--phases``, see ``PHASES``): ``eager``; ``compiled`` (``torch.compile`` of the transformer,
shared by the pipeline and the engine: the compiled baseline's conditions); ``compiled+vae`` (the VAE
encoder and decoder compiled too); ``cudagraphs`` (the transformer compiled with CUDA graphs). Each
phase also records how far the engine's output is from the eager pipeline's on the same frame, prompt
and seed (``max_abs`` on [0, 1] pixels and PSNR), so a speed-up that changes the pixels shows up next to
its timing. With random weights every rounding difference is amplified; the compiled baseline's own
deviation is the yardstick for what rounding alone does.

Timing: each call is bracketed by device synchronisation and timed with a host clock, after warm-up calls
(the compiled phase's first call compiles and is reported separately); the table shows medians. The
record (environment, arguments, every row with its percentiles) is written as JSON under ``--out``.

Unless ``--model`` names a checkpoint, the weights are random: the timings
are those of the real architecture and sizes, the images are noise.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.engines.base import OUTPUT_SIZE, FrameJob
from inference.engines.flux2 import DEFAULT_MODEL, Flux2Engine
from inference.engines.klein_config import MAX_SEQUENCE_LENGTH, TEXT_ENCODER_OUT_LAYERS

PROMPTS = (
    "an oil painting, thick impasto brush strokes, warm palette",
    "a claymation character, soft plasticine, studio lighting",
    "pixel art, 16-bit palette, crisp edges",
    "a neon noir comic panel, heavy ink, magenta and cyan",
)


@dataclass(frozen=True)
class Phase:
    """What is compiled in a phase. Phases run in the order given; compilation is never undone, so
    list them from least to most compiled."""

    transformer_mode: str | None  # "eager": not compiled; None: torch.compile's default mode
    vae: bool  # VAE encoder and decoder compiled
    baseline: bool  # measure the baseline pipeline too (only where it runs as the seed product ran it)
    fuse_qkv: bool = False  # one projection for q, k and v (and for the text stream's) in the double blocks
    # Approximations (the engine's mode="approximate" options):
    text_tokens: int = MAX_SEQUENCE_LENGTH
    fp8: bool = False


PHASES = {
    "eager": Phase(transformer_mode="eager", vae=False, baseline=True),
    # The compiled baseline: the transformer compiled, the rest eager.
    "compiled": Phase(transformer_mode=None, vae=False, baseline=True),
    # The pipeline shares the VAE, so from here on it no longer runs as the seed product did: engine only.
    "compiled+vae": Phase(transformer_mode=None, vae=True, baseline=False),
    "cudagraphs": Phase(transformer_mode="reduce-overhead", vae=True, baseline=False),
    "cudagraphs+fused-qkv": Phase(
        transformer_mode="reduce-overhead", vae=True, baseline=False, fuse_qkv=True
    ),
    # Approximate: the prompt embedding cut from 512 to 128 tokens, then FP8 transformer blocks, then both.
    "text128": Phase(transformer_mode=None, vae=True, baseline=False, text_tokens=128),
    "fp8": Phase(transformer_mode=None, vae=True, baseline=False, fp8=True),
    "fp8+text128": Phase(transformer_mode=None, vae=True, baseline=False, fp8=True, text_tokens=128),
}


# Engines built from scratch with their production options: ``warm_up()`` (compiling every batch size) is
# timed, then ``render()``; the phases above instead change one engine step by step.
ENGINE_OPTIONS: dict[str, dict[str, Any]] = {
    "exact-compiled": {"compile": True},
    "fastest": {"compile": True, "mode": "approximate", "fp8": True, "text_tokens": 128},
}


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


def deviation(image: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, PSNR in dB) of two float images in [0, 1]."""
    diff = image.float().cpu() - reference.float().cpu()
    mse = float(diff.pow(2).mean())
    return float(diff.abs().max()), (math.inf if mse == 0 else 10 * math.log10(1.0 / mse))


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
    """The cases of one run; each ``measure_*`` appends rows. New modes and concurrency cases go here."""

    def __init__(self, engine: Flux2Engine, args: argparse.Namespace) -> None:
        self.engine = engine
        self.args = args
        self.pipe = engine.load()
        self.device = engine.device
        self.rows: list[Row] = []
        self.frames = [webcam_frame(seed) for seed in range(max(args.batch))]
        self.jpegs = [to_jpeg(frame) for frame in self.frames]
        self.frame_image = Image.fromarray(self.frames[0])  # the baseline's input, decoded once
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(max(args.batch))]
        self.seeds = list(range(1, max(args.batch) + 1))
        # The eager pipeline's output per step count: what every phase's deviation is measured against.
        self.references: dict[int, torch.Tensor] = {}
        self.transformer_mode: str | None = "eager"
        self.vae_compiled = False
        self.qkv_fused = False

    def _run(self, phase: str, case: str, steps: int | None, batch: int, fn: Callable[[], Any]) -> Row:
        warmup = self.args.warmup + (1 if phase != "eager" else 0)
        try:
            times, first = time_calls(fn, device=self.device, warmup=warmup, iters=self.args.iters)
            row = Row(phase, case, steps, batch, times, first)
        except Exception as error:  # a failing case must not cost the rest of the run's measurements
            row = Row(phase, case, steps, batch, [], error=f"{type(error).__name__}: {error}")
        self.rows.append(row)
        print(f"  {phase:12s} {case:14s} steps={steps} batch={batch}: {row.median_ms:8.2f} ms", flush=True)
        return row

    def compute_references(self) -> None:
        """The eager pipeline's output for each step count, before anything is compiled or approximated."""
        for steps in self.args.steps:
            self.references[steps] = self.baseline_call(steps, "pt")

    def baseline_call(self, steps: int, output_type: str = "pil") -> Any:
        """The seed product's per-frame call: PIL frame in, cached prompt embeddings, a seeded generator."""
        return self.pipe(
            image=self.frame_image,
            prompt_embeds=self.engine.prompt_embeds(self.prompts[0]),
            num_inference_steps=steps,
            guidance_scale=1.0,
            height=OUTPUT_SIZE,
            width=OUTPUT_SIZE,
            generator=torch.Generator(device=self.device).manual_seed(self.seeds[0]),
            output_type=output_type,
        ).images

    def measure_baseline(self, phase: str, steps: int) -> None:
        row = self._run(phase, "baseline", steps, 1, lambda: self.baseline_call(steps))
        if row.error is None:
            row.max_abs, row.psnr_db = deviation(self.baseline_call(steps, "pt"), self.references[steps])

    def measure_engine(self, phase: str, steps: int) -> None:
        engine = self.engine
        frame = torch.from_numpy(self.frames[0].copy()).permute(2, 0, 1)[None].to(self.device)
        prompt, seed = self.prompts[0], self.seeds[0]
        row = self._run(
            phase,
            "render_frames",
            steps,
            1,
            lambda: engine.render_frames(frame, [prompt], steps=steps, seeds=[seed]),
        )
        if row.error is None:
            output = engine.render_frames(frame, [prompt], steps=steps, seeds=[seed])
            row.max_abs, row.psnr_db = deviation(output, self.references[steps])
        for batch in self.args.batch:
            jobs = [
                FrameJob(f"session-{i}", 0, self.jpegs[i], self.prompts[i], steps, self.seeds[i])
                for i in range(batch)
            ]
            self._run(phase, "render", steps, batch, lambda jobs=jobs: engine.render(jobs))

    def measure_components(self, phase: str) -> None:
        pipe, engine, device = self.pipe, self.engine, self.device
        transformer, vae = pipe.transformer, pipe.vae
        config = transformer.config
        dtype = transformer.dtype
        tokens = (OUTPUT_SIZE // (pipe.vae_scale_factor * 2)) ** 2
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

        prompt_embeds = engine.prompt_embeds(self.prompts[0])
        hidden_states = randn(1, 2 * tokens, config.in_channels)
        text_ids = pipe._prepare_text_ids(prompt_embeds).to(device)
        img_ids = torch.cat([engine._latent_ids, engine._image_latent_ids], dim=1)
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
            self._run(
                phase,
                "text_encoder",
                None,
                1,
                lambda: pipe._get_qwen3_prompt_embeds(
                    text_encoder=pipe.text_encoder,
                    tokenizer=pipe.tokenizer,
                    prompt=self.prompts[1],
                    device=device,
                    max_sequence_length=MAX_SEQUENCE_LENGTH,
                    hidden_states_layers=TEXT_ENCODER_OUT_LAYERS,
                ),
            )

    def measure_engine_options(self, name: str) -> None:
        """Build a second engine with ENGINE_OPTIONS[name] (same weights: same seed and device), time its
        warm_up(), then its renders, and free it."""
        phase = f"engine:{name}"
        print(f"phase {phase}", flush=True)
        base = self.engine
        engine = Flux2Engine(
            random_weights=base.random_weights,
            tiny=base.tiny,
            device=base.device,
            dtype=base.dtype,
            max_batch=max(self.args.batch),
            steps=self.args.steps[0],
            **ENGINE_OPTIONS[name],
        )
        start = time.perf_counter()
        engine.warm_up()
        warm_up_ms = 1000 * (time.perf_counter() - start)
        self.rows.append(Row(phase, "warm_up", engine.steps, 1, [warm_up_ms]))
        print(f"  {phase} warm_up: {warm_up_ms / 1000:.1f} s", flush=True)
        frame = torch.from_numpy(self.frames[0].copy()).permute(2, 0, 1)[None].to(self.device)
        for steps in self.args.steps:
            output = engine.render_frames(frame, [self.prompts[0]], steps=steps, seeds=[self.seeds[0]])
            for batch in self.args.batch:
                jobs = [
                    FrameJob(f"session-{i}", 0, self.jpegs[i], self.prompts[i], steps, self.seeds[i])
                    for i in range(batch)
                ]
                row = self._run(
                    phase, "render", steps, batch, lambda jobs=jobs, engine=engine: engine.render(jobs)
                )
                if batch == 1:
                    row.max_abs, row.psnr_db = deviation(output, self.references[steps])
        del engine
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_phase(self, phase: str) -> None:
        print(f"phase {phase}", flush=True)
        setup = PHASES[phase]
        # Approximations are set on the engine directly (its constructor takes them only with
        # mode="approximate"); text_tokens applies per call, FP8 quantization is permanent.
        approximate = setup.fp8 or setup.text_tokens != MAX_SEQUENCE_LENGTH
        self.engine.mode = "approximate" if approximate else "exact"
        self.engine.text_tokens = setup.text_tokens
        if setup.fp8:
            self.engine.enable_fp8()  # a compiled transformer recompiles on its next call
        elif self.engine.fp8:
            raise ValueError(f"phase {phase} comes after an fp8 phase, which cannot be undone")
        if setup.fuse_qkv and not self.qkv_fused:
            self.engine.fuse_qkv()  # a compiled transformer recompiles on its next call
            self.qkv_fused = True
        # Compiles lazily: each shape's first call (a warm-up call, reported as 'first ms') compiles.
        if setup.transformer_mode != self.transformer_mode:
            self.engine.compile_components(
                transformer=True, vae=False, transformer_mode=setup.transformer_mode
            )
            self.transformer_mode = setup.transformer_mode
        if setup.vae and not self.vae_compiled:
            self.engine.compile_components(transformer=False, vae=True)
            self.vae_compiled = True
        for steps in self.args.steps:
            if setup.baseline and not self.args.skip_baseline:
                self.measure_baseline(phase, steps)
            self.measure_engine(phase, steps)
        if self.args.components:
            self.measure_components(phase)
        if self.args.profile:
            self.profile(phase)

    def profile(self, phase: str) -> None:
        """Write the device-time breakdown of one engine render (2 steps, batch 1) by operator."""
        from torch.profiler import ProfilerActivity, profile

        frame = torch.from_numpy(self.frames[0].copy()).permute(2, 0, 1)[None].to(self.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            self.engine.render_frames(frame, [self.prompts[0]], steps=2, seeds=[self.seeds[0]])
            _sync(self.device)
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70)
        path = Path(self.args.out) / f"profile-{phase.replace('+', '_')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        print(f"  profile of one 2-step render written to {path}")


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
        "random_weights": engine.random_weights or engine.tiny,
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
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'phase':12s} {'case':14s} {'steps':>5s} {'batch':>5s} {'median ms':>10s} {'ms/frame':>9s} "
        f"{'fps':>7s} {'first ms':>9s} {'max_abs':>8s} {'PSNR dB':>8s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.error:
            lines.append(
                f"{row.phase:12s} {row.case:14s} {row.steps or '':>5} {row.batch:5d}  ERROR {row.error}"
            )
            continue
        fps = 1000.0 / row.per_frame_ms
        first = f"{row.first_call_ms:9.1f}" if row.first_call_ms is not None else f"{'':9s}"
        max_abs = f"{row.max_abs:8.1e}" if row.max_abs is not None else f"{'':8s}"
        psnr = f"{row.psnr_db:8.1f}" if row.psnr_db is not None else f"{'':8s}"
        lines.append(
            f"{row.phase:12s} {row.case:14s} {row.steps or '':>5} {row.batch:5d} {row.median_ms:10.2f} "
            f"{row.per_frame_ms:9.2f} {fps:7.1f} {first} {max_abs} {psnr}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m inference.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help=f"checkpoint to load (default: random weights; {DEFAULT_MODEL})"
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny test configuration")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="render() batch sizes")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--phases", nargs="*", default=["eager", "compiled"], choices=list(PHASES))
    parser.add_argument(
        "--engines",
        nargs="*",
        default=[],
        choices=list(ENGINE_OPTIONS),
        help="fresh engines to warm up and time",
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--no-components", dest="components", action="store_false")
    parser.add_argument("--profile", action="store_true", help="write a per-operator profile of each phase")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON record")
    args = parser.parse_args(argv)
    if 1 not in args.batch:
        args.batch = [1, *args.batch]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    engine = Flux2Engine(
        model=args.model or DEFAULT_MODEL,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        random_weights=args.model is None and not args.tiny,
        tiny=args.tiny,
        max_batch=max(args.batch),
    )
    start = time.perf_counter()
    bench = Bench(engine, args)
    load_s = time.perf_counter() - start
    print(f"{engine.model} on {engine.device} ({engine.dtype}): loaded in {load_s:.1f}s", flush=True)
    bench.compute_references()
    started = datetime.now(UTC)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tiny" if args.tiny else ("random-klein-4B" if args.model is None else Path(args.model).name)
    record: dict[str, Any] = {}
    for phase in [*args.phases, *(f"engine:{name}" for name in args.engines)]:
        if phase.startswith("engine:"):
            bench.measure_engine_options(phase.removeprefix("engine:"))
        else:
            bench.run_phase(phase)
        # Rewritten after every phase, so a run cut short still leaves what it measured.
        record = {
            "started": started.isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv),
            "load_s": round(load_s, 2),
            "environment": environment(engine),
            "rows": [row.record() for row in bench.rows],
        }
        device_tag = record["environment"].get("gpu", engine.device.type).replace(" ", "-")
        path = out / f"{started:%Y%m%dT%H%M%S}-{name}-{device_tag}.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        record["path"] = str(path)

    env = record["environment"]
    print(f"\nwrote {record['path']}")
    print(
        f"{env['model']} | {env.get('gpu', env.get('cpu'))} | torch {env['torch']}"
        f" | diffusers {env['diffusers']} | {env['dtype']} | iters {args.iters}, medians"
    )
    print(format_table(bench.rows))
    return record


if __name__ == "__main__":
    main()
