"""The ``flux2`` engine: live restyling with FLUX.2 [klein] 4B through diffusers' components.

Each webcam frame conditions generation as a reference image, exactly as ``Flux2KleinPipeline`` does: the
frame is VAE-encoded and its latent tokens are appended after the noise tokens, and a 2-4 step distilled
Euler loop turns seeded noise into a 512x512 image. Per frame the engine runs only the VAE encoder, the
transformer steps and the VAE decoder; everything that depends on the session rather than the frame is
computed once and cached:

* prompt embeddings (Qwen3 hidden states of layers 9/18/27), one text-encoder pass per distinct prompt,
  kept in an LRU cache;
* the initial noise of each session seed (``FrameJob.seed``), so a session's frames all start from the
  same noise, which is what keeps a live stream temporally stable;
* the timestep schedule per step count, position ids and the VAE's latent statistics.

Jobs of one ``render()`` call are stacked into one transformer batch even when their prompts differ
(jobs with different step counts go in separate batches, since their schedules differ).

Render modes (``RenderMode``; each session picks one per frame, ``FrameJob.mode``):

* ``"exact"`` (the default): the same arithmetic as calling ``Flux2KleinPipeline`` with the same weights,
  frame, prompt and ``generator=torch.Generator(device).manual_seed(seed)``; on the same device and
  without compilation the output tensors are bit-identical (tests check this). This is the correctness
  gate for every speed-up.
* ``"fast"`` (approximate): FP8 matrix products in the transformer blocks, the prompt cut to 128 tokens,
  and the reference frame's keys and values computed once per frame and reused by the later steps, as
  ``Flux2KleinKVPipeline`` does (reference tokens attend only to themselves, at a fixed timestep, so the
  steps after the first run on the noise and text tokens alone).
* ``"turbo"`` (approximate): ``fast`` with the reference frame encoded at 256x256 (256 tokens instead of
  1024); the output stays 512x512.

A mode is a ``ModeRecipe`` (which approximations it applies); ``python -m bench.gpu`` also builds
single-lever recipes to measure each approximation on its own and reports every mode's deviation from the
exact pipeline.

Frames stay tensors end to end: JPEG bytes are decoded by nvJPEG on the GPU (``torchvision.io``) when
torchvision is installed and the engine runs on CUDA, and results are encoded the same way; otherwise
Pillow decodes and encodes in the calling thread. A frame that is not 512x512 is center-cropped to a
square and resized (bilinear, antialiased) on the device.

Options of ``create_flux2_engine(**options)`` and ``Flux2Engine(...)``, all keyword-only:

``model``
    Hugging Face repo id or local directory of a diffusers-format FLUX.2 [klein] checkpoint
    (default ``"black-forest-labs/FLUX.2-klein-4B"``). Ignored with ``random_weights`` or ``tiny``.
``cache_dir``
    Where downloaded weights are stored (default: huggingface_hub's cache, ``HF_HOME``); point it at a
    persistent volume so a restarted worker does not download ~16 GB again.
``revision``, ``local_files_only``
    Passed to ``huggingface_hub.snapshot_download``.
``device``
    ``"cuda"``, ``"cuda:1"``, ``"cpu"``...; default CUDA when available, else CPU.
``dtype``
    ``"bfloat16"`` (default on CUDA), ``"float16"`` or ``"float32"`` (default on CPU), or a torch dtype.
``steps``
    Denoising steps used when a job asks for 0 or fewer (default 2; klein is distilled for 4).
``max_batch``
    How many jobs one ``render()`` call accepts (default 4).
``random_weights``
    Build the real klein-4B architecture with random weights instead of loading a checkpoint: real
    size and speed, meaningless pixels. For benchmarks on machines without the weights.
``tiny``
    Build a tiny configuration with random weights (``klein_config.TINY``) so the real pipeline code
    runs on a CPU in tests.
``weights_seed``
    Seed of the random weights (default 0).
``modes``
    Ids of the built-in modes (``MODE_RECIPES``) this engine offers, default all of them; the first
    is the default mode. ``warm_up()`` compiles the default one; each other mode's compilation is a
    ``deferred_warm_ups()`` task the scheduler runs while idle.
``custom_modes``
    More modes as ``{id: ModeRecipe}`` (benchmarks measure one approximation at a time this way).
``compile``
    ``torch.compile`` the transformer and the VAE's encoder and decoder; default (None): on CUDA yes,
    on CPU no. Compiled kernels round differently from eager ones, so outputs move by rounding-level
    amounts (as those of a compiled Flux2KleinPipeline do); the math stays the pipeline's. A compiled VAE
    also gets channels-last weights and its mid-block attention as plain products (see
    ``compile_components``). docs/performance.md has the figures.
``compile_scope``
    ``"blocks"``: regional compilation, diffusers' ``compile_repeated_blocks``: the double and the
    single block are each compiled once and reused by all 5 and 20 of them, which makes warm-up several
    times shorter than compiling the whole transformer as one graph (``"full"``), at a few ms per frame.
    ``"auto"`` (default): the exact transformer whole (one call signature, the fastest frame), the FP8
    one by blocks (its modes make several call signatures).
``cuda_graphs``
    Replay each frame's GPU work as one captured CUDA graph (``torch.cuda.CUDAGraph``) instead of
    launching its ~2,000 kernels one by one from Python; default (None): when ``compile`` is on and the
    device is CUDA. One graph per (mode, steps, batch size), captured on first use (the warm-up captures
    the default ones); all share one memory pool. The bench compares each mode replayed and launched: on
    an H200 ``turbo`` was bit-identical, while the modes with a 512² reference differed at rounding level
    (max 0.027 on [0, 1] pixels with random weights, the same 44.6 dB from the eager pipeline), so some
    library kernel is chosen differently inside a capture.
``prompt_cache_size``
    How many prompts' embeddings to keep (default 32; about 8 MB each at klein-4B size in bf16).
``jpeg_quality``
    Quality of the output JPEGs (default 90).
"""

from __future__ import annotations

import copy
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from inference.engines.base import FrameJob
from inference.engines.klein_config import (
    KLEIN_4B,
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_OUT_LAYERS,
    TINY,
    build_random_components,
)
from inference.protocol import MAX_STEPS, MIN_STEPS, OUTPUT_SIZE, RenderMode

try:  # nvJPEG decode/encode on the GPU; the CPU-only install has no torchvision and uses Pillow.
    import torchvision.io as tvio
except ImportError:  # pragma: no cover - depends on the install
    tvio = None

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "black-forest-labs/FLUX.2-klein-4B"
FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max
# Only the diffusers-format folders: the repo also carries single-file checkpoints we never read.
_CHECKPOINT_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "tokenizer/*",
    "transformer/*",
    "vae/*",
]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPILE_SCOPES = ("auto", "blocks", "full")


@dataclass(frozen=True, slots=True)
class ModeRecipe:
    """Which approximations a render mode applies; the default recipe is the exact pipeline."""

    # The transformer blocks' linear layers multiply in FP8 (e4m3) on the tensor cores: weights quantized
    # once with one scale per output channel, activations per token on the fly, float32 accumulation.
    fp8: bool = False
    # How many prompt-embedding tokens the transformer attends to. The pipeline pads every prompt to 512
    # and attends to the padding too; the text encoder is causal, so the first `text_tokens` embeddings are
    # unchanged by dropping the rest, but the transformer's output changes (and longer prompts are cut).
    text_tokens: int = MAX_SEQUENCE_LENGTH
    # Flux2KleinKVPipeline's scheme: at the first step the reference tokens attend only to themselves, at
    # timestep 0, and their keys/values are cached; later steps run without them and attend to the cache.
    reference_kv_reuse: bool = False
    # Side of the square the webcam frame is encoded at as the reference image (512: 1024 tokens).
    reference_size: int = OUTPUT_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.text_tokens <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"text_tokens must be in 1..{MAX_SEQUENCE_LENGTH}, got {self.text_tokens}")
        if self.reference_size % 16 or not 64 <= self.reference_size <= OUTPUT_SIZE:
            raise ValueError(f"reference_size must be a multiple of 16 in 64..{OUTPUT_SIZE}")

    @property
    def approximate(self) -> bool:
        return self != ModeRecipe()

    def describe(self) -> str:
        """The approximations, e.g. "fp8, 128 text tokens, reference K/V reuse"; "exact" when none."""
        parts = ["fp8"] if self.fp8 else []
        if self.text_tokens != MAX_SEQUENCE_LENGTH:
            parts.append(f"{self.text_tokens} text tokens")
        if self.reference_kv_reuse:
            parts.append("reference K/V reuse")
        if self.reference_size != OUTPUT_SIZE:
            parts.append(f"reference {self.reference_size}x{self.reference_size}")
        return ", ".join(parts) or "exact"


EXACT = RenderMode(
    id="exact",
    label="Exact",
    approximate=False,
    detail="FLUX.2 [klein] computed as the reference pipeline computes it (bf16, full prompt and frame).",
)
FAST = RenderMode(
    id="fast",
    label="Fast",
    approximate=True,
    detail="Approximate: FP8 matrix products, a 128-token prompt, and the webcam frame's attention keys "
    "and values computed once per frame instead of at every step.",
)
TURBO = RenderMode(
    id="turbo",
    label="Turbo",
    approximate=True,
    detail="Approximate: as Fast, with the webcam frame read at 256x256 instead of 512x512 "
    "(the output stays 512x512).",
)
# The built-in modes, fastest last; the worker's FLUX2_MODES picks from these ids.
MODE_RECIPES: dict[str, tuple[RenderMode, ModeRecipe]] = {
    "exact": (EXACT, ModeRecipe()),
    "fast": (FAST, ModeRecipe(fp8=True, text_tokens=128, reference_kv_reuse=True)),
    "turbo": (TURBO, ModeRecipe(fp8=True, text_tokens=128, reference_kv_reuse=True, reference_size=256)),
}


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def download_checkpoint(
    model: str,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local directory of ``model``: itself if it is a directory, else a snapshot of the Hub repo,
    downloaded into ``cache_dir`` with huggingface_hub's progress bars (files already there are reused)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    # A worker's first start downloads ~16 GB; the progress bars are the only sign it is not stuck.
    enable_progress_bars()
    logger.info("fetching %s (revision %s) into %s", model, revision or "main", cache_dir or "the HF cache")
    path = snapshot_download(
        model,
        revision=revision,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        allow_patterns=_CHECKPOINT_PATTERNS,
        local_files_only=local_files_only,
    )
    logger.info("%s is at %s", model, path)
    return Path(path)


class Flux2Engine:
    """Renders batches of webcam frames with FLUX.2 [klein]; see the module docstring for the options."""

    name = "flux2"

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        steps: int = 2,
        max_batch: int = 4,
        random_weights: bool = False,
        tiny: bool = False,
        weights_seed: int = 0,
        modes: Sequence[str] = tuple(MODE_RECIPES),
        custom_modes: Mapping[str, ModeRecipe] | None = None,
        compile: bool | None = None,
        compile_scope: str = "auto",
        cuda_graphs: bool | None = None,
        fuse_qkv: bool = False,
        prompt_cache_size: int = 32,
        jpeg_quality: int = 90,
        pipeline: Flux2KleinPipeline | None = None,
    ) -> None:
        unknown = [mode for mode in modes if mode not in MODE_RECIPES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; built-in modes are {', '.join(MODE_RECIPES)}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        self._recipes: dict[str, ModeRecipe] = {mode: MODE_RECIPES[mode][1] for mode in modes}
        mode_list = [MODE_RECIPES[mode][0] for mode in modes]
        for mode_id, recipe in (custom_modes or {}).items():
            if mode_id in self._recipes:
                raise ValueError(f"custom mode {mode_id!r} is already a mode")
            self._recipes[mode_id] = recipe
            mode_list.append(
                RenderMode(
                    id=mode_id, label=mode_id, approximate=recipe.approximate, detail=recipe.describe()
                )
            )
        if not mode_list:
            raise ValueError("an engine needs at least one mode")
        self.modes: tuple[RenderMode, ...] = tuple(mode_list)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model_id = model
        self.cache_dir = cache_dir
        self.revision = revision
        self.local_files_only = local_files_only
        self.steps = steps
        self.max_batch = max_batch
        self.random_weights = random_weights
        self.tiny = tiny
        self.weights_seed = weights_seed
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.compile_scope = compile_scope
        self.cuda_graphs = self.compile if cuda_graphs is None else cuda_graphs
        self.fuse_qkv_projections = fuse_qkv
        self.prompt_cache_size = prompt_cache_size
        self.jpeg_quality = jpeg_quality
        if tiny:
            self.model = "FLUX.2 [klein] tiny test configuration (random weights)"
        elif random_weights:
            self.model = "FLUX.2 [klein] 4B architecture (random weights)"
        else:
            self.model = "FLUX.2 [klein] 4B"

        self.pipe: Flux2KleinPipeline | None = None
        self._load_lock = threading.Lock()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._noise_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_ids: dict[tuple[int, ...], torch.Tensor] = {}
        self._reference_ids: dict[int, torch.Tensor] = {}
        self._fp8_transformer: Flux2Transformer2DModel | None = None
        self._warm_modes: set[str] = set()
        self._frame_graphs: dict[tuple[str, int, int], _FrameGraph] = {}
        self._graph_pool: Any = None
        if pipeline is not None:
            self._attach(pipeline)

    # ------------------------------------------------------------------ loading

    def load(self) -> Flux2KleinPipeline:
        """Build or load the pipeline's components on the device (once)."""
        with self._load_lock:
            if self.pipe is None:
                self._attach(self._build_pipeline())
            assert self.pipe is not None
            return self.pipe

    def _build_pipeline(self) -> Flux2KleinPipeline:
        if self.tiny or self.random_weights:
            config = TINY if self.tiny else KLEIN_4B
            logger.info("building %s with random weights on %s (%s)", config.name, self.device, self.dtype)
            components = build_random_components(
                config, device=self.device, dtype=self.dtype, seed=self.weights_seed
            )
            return Flux2KleinPipeline(**components, is_distilled=True)
        path = download_checkpoint(
            self.model_id,
            cache_dir=self.cache_dir,
            revision=self.revision,
            local_files_only=self.local_files_only,
        )
        pipe = Flux2KleinPipeline.from_pretrained(path, torch_dtype=self.dtype, is_distilled=True)
        return pipe.to(self.device)

    def _attach(self, pipe: Flux2KleinPipeline) -> None:
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        vae = pipe.vae
        # Patched-latent geometry of a 512x512 frame: VAE downsampling x 2x2 patches.
        self._latent_size = OUTPUT_SIZE // (pipe.vae_scale_factor * 2)
        self._latent_channels = pipe.transformer.config.in_channels
        # The VAE's latent statistics, in the form (and dtype) Flux2KleinPipeline computes them per call.
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        self._bn_mean = bn_mean.to(self.device, self.dtype)
        self._bn_std = bn_std.to(self.device, self.dtype)
        shape = (1, self._latent_channels, self._latent_size, self._latent_size)
        self._latent_ids = Flux2KleinPipeline._prepare_latent_ids(torch.empty(shape, device="meta")).to(
            self.device
        )
        # The frame normalisation of VaeImageProcessor (x / 255 * 2 - 1 in float32, then the VAE's dtype) as
        # a table of its 256 possible results, computed on the CPU as the pipeline computes them. On CUDA,
        # dividing by a scalar is done as a multiplication by its reciprocal, which rounds differently.
        levels = torch.arange(256, dtype=torch.float32) / 255.0
        self._pixel_values = (2.0 * levels - 1.0).to(vae.dtype).to(self.device)
        if self.fuse_qkv_projections:
            self.fuse_qkv()
        recipes = self._recipes.values()
        if any(recipe.fp8 for recipe in recipes):
            # A second transformer sharing nothing with the first: FP8 blocks, and the bf16 one stays exact.
            # Costs half the bf16 transformer's memory again (~4 GB at klein-4B size).
            self._fp8_transformer = copy.deepcopy(pipe.transformer)
            # One product for q, k and v of each stream of the double blocks instead of three: the text
            # stream's products are only 128 rows, where FP8 kernels are mostly launch and tail.
            self._fp8_transformer.fuse_qkv_projections()
            quantize_transformer_fp8(self._fp8_transformer)
        for recipe in recipes:
            if recipe.reference_kv_reuse:
                _use_kv_attention(self._transformer_for(recipe))
        if self.compile:
            self.compile_components()

    def _transformer_for(self, recipe: ModeRecipe) -> Flux2Transformer2DModel:
        assert self.pipe is not None
        if recipe.fp8:
            assert self._fp8_transformer is not None
            return self._fp8_transformer
        return self.pipe.transformer

    def _reference_latent_ids(self, size: int) -> torch.Tensor:
        # One reference image per job, at time coordinate 10 as Flux2KleinPipeline places the first one.
        if size not in self._reference_ids:
            side = size // (self.pipe.vae_scale_factor * 2)  # type: ignore[union-attr]
            shape = (1, self._latent_channels, side, side)
            ids = Flux2KleinPipeline._prepare_image_ids([torch.empty(shape, device="meta")])
            self._reference_ids[size] = ids.to(self.device)
        return self._reference_ids[size]

    def fuse_qkv(self) -> None:
        """Fuse the transformer's q/k/v projections in place (diffusers' ``fuse_qkv_projections``)."""
        pipe = self.load() if self.pipe is None else self.pipe
        pipe.transformer.fuse_qkv_projections()

    def compile_components(self, *, transformer: bool = True, vae: bool = True) -> None:
        """``torch.compile`` the transformer and/or the VAE encoder and decoder in place (compilation itself
        happens in the first call of each input shape). Compiling a module again replaces its compilation."""
        pipe = self.load() if self.pipe is None else self.pipe
        # Both transformers' blocks share one code object per block class, and every mode and batch shape
        # is a graph of its own under it: more than dynamo's default limit of 8, past which it gives up.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024
        )
        if transformer:
            transformers = [pipe.transformer]
            if self._fp8_transformer is not None:
                transformers.append(self._fp8_transformer)
            # dynamic=None: batch size 1 gets a graph of its own, the first other batch size a graph with a
            # symbolic batch dimension that serves every larger batch (no compilation per session count).
            for module in transformers:
                scope = self.compile_scope
                if scope == "auto":
                    # The exact transformer has one call signature: one whole graph is the fastest frame.
                    # The FP8 one has several (extract, cached, reference sizes): blocks compile quicker.
                    scope = "full" if module is pipe.transformer else "blocks"
                if scope == "blocks":
                    module.compile_repeated_blocks(fullgraph=True, dynamic=None)
                else:
                    module.compile(fullgraph=True, dynamic=None)
        if vae:
            # The VAE runs once per frame each way; GroupNorm at batch 1 is where eager PyTorch loses most
            # (one thread block per group), and a compiled reduction does not.
            # Static shapes: a dynamic graph would serve the 256² reference frames of "turbo" too, but it is
            # then also what the 512² frames run through (dynamo tries its newest graph first), and its
            # kernels are slower (exact mode 73 -> 78 ms per frame on an H200 when turbo was warmed up).
            # Channels-last weights, the layout the tensor-core convolutions read, so no layout copies sit
            # between them; and the mid-block attention (one head of 512 channels, which the flash kernels
            # do not take) as plain matrix products that inductor fuses. Each saves 0.2-0.4 ms per pass on an
            # H200 (decoder at 512²: 7.35 -> 6.99 ms with both). Compiled kernels round differently anyway.
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.vae.set_attn_processor(AttnProcessor())
            pipe.vae.encoder.compile(fullgraph=True, dynamic=False)
            pipe.vae.decoder.compile(fullgraph=True, dynamic=False)

    # ------------------------------------------------------------------ the Engine protocol

    def warm_up(self) -> None:
        """Load the weights and warm the default mode, which is all the first frame needs; the other modes
        are ``deferred_warm_ups()``. Warming renders throw-away frames through ``render()`` (JPEG codecs
        included): the first call allocates workspaces, and with ``compile`` each mode's transformer calls
        compile on first use (seconds from a warm compile cache, tens of seconds from an empty one), once
        for batch size 1 and once for a symbolic batch size that serves the rest."""
        self.load()
        self.warm_up_mode(self.modes[0].id)

    def deferred_warm_ups(self) -> list[Callable[[], None]]:
        """Tasks for the scheduler to run while no frame is waiting: one per mode not warmed yet (a mode
        chosen before its task ran compiles on its first frame instead, once), then, with CUDA graphs, one
        per other step count of each mode, so that changing steps mid-stream does not wait for a capture."""
        cold = [mode.id for mode in self.modes if mode.id not in self._warm_modes]
        tasks = [partial(self.warm_up_mode, mode) for mode in cold]
        if self.cuda_graphs and self.device.type == "cuda":
            tasks += [
                partial(self._capture_graph, mode.id, steps)
                for mode in self.modes
                for steps in range(MIN_STEPS, MAX_STEPS + 1)
            ]
        return tasks

    def warm_up_mode(self, mode: str) -> None:
        if mode in self._warm_modes:
            return
        jpeg = self._warm_up_jpeg()
        sizes = sorted({1, min(2, self.max_batch), self.max_batch}) if self.compile else [1]
        # At least 2 steps: reference K/V reuse runs a different transformer call from the second step on.
        steps = max(2, self.steps)
        for size in sizes:
            self.render([FrameJob("warm-up", 0, jpeg, "warm-up", steps, seed, mode) for seed in range(size)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._warm_modes.add(mode)

    def _capture_graph(self, mode: str, steps: int) -> None:
        if (mode, steps, 1) not in self._frame_graphs:
            self.render([FrameJob("warm-up", 0, self._warm_up_jpeg(), "warm-up", steps, 0, mode)])

    def _warm_up_jpeg(self) -> bytes:
        return self.encode_jpegs(_gradient_frame(self.device).to(torch.float32) / 255)[0]

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        """One 512x512 JPEG per job, in order."""
        if len(jobs) > self.max_batch:
            raise ValueError(f"render() accepts at most {self.max_batch} jobs, got {len(jobs)}")
        if not jobs:
            return []
        self.load()
        groups = _group_jobs(jobs, self.modes[0].id, self.steps)
        for mode, _ in groups:
            if mode not in self._recipes:
                raise ValueError(f"unknown mode {mode!r}; this engine has {', '.join(self._recipes)}")
        frames = self.decode_frames([job.jpeg for job in jobs])
        images: list[torch.Tensor | None] = [None] * len(jobs)
        for (mode, steps), indices in groups.items():
            rendered = self.render_frames(
                frames[indices],
                [jobs[i].prompt for i in indices],
                steps=steps,
                seeds=[jobs[i].seed for i in indices],
                mode=mode,
            )
            for row, index in enumerate(indices):
                images[index] = rendered[row]
        return self.encode_jpegs(torch.stack(images))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ frames in and out

    def decode_frames(self, jpegs: Sequence[bytes]) -> torch.Tensor:
        """uint8 RGB frames (B, 3, 512, 512) on the engine's device."""
        if tvio is not None and self.device.type == "cuda":
            data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
            decoded = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=self.device)
        else:
            decoded = []
            for jpeg in jpegs:
                with Image.open(io.BytesIO(jpeg)) as image:
                    array = np.array(image.convert("RGB"))  # a writable copy for torch
                decoded.append(torch.from_numpy(array).permute(2, 0, 1).to(self.device))
        return torch.stack([_center_square(frame) for frame in decoded])

    def encode_jpegs(self, images: torch.Tensor) -> list[bytes]:
        """JPEG bytes of float images in [0, 1] (B, 3, H, W), rounded to 8 bits as diffusers' PIL output."""
        pixels = (images.nan_to_num(0.0) * 255).round().clamp(0, 255).to(torch.uint8)
        if tvio is not None and pixels.device.type == "cuda":
            encoded = tvio.encode_jpeg(list(pixels), quality=self.jpeg_quality)
            return [bytes(data.cpu().numpy()) for data in encoded]
        out = []
        for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.jpeg_quality)
            out.append(buffer.getvalue())
        return out

    # ------------------------------------------------------------------ cached per prompt / seed / steps

    def prompt_embeds(self, prompt: str) -> torch.Tensor:
        """(1, 512, joint_attention_dim) embedding of ``prompt``; the text encoder runs once per prompt."""
        embeds = self._prompt_cache.get(prompt)
        if embeds is not None:
            self._prompt_cache.move_to_end(prompt)
            return embeds
        pipe = self.load()
        # Encoded alone, not batched with other new prompts, so a prompt's embedding never depends on
        # which other prompts arrived in the same batch.
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            prompt=prompt,
            device=self.device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            hidden_states_layers=TEXT_ENCODER_OUT_LAYERS,
        )
        self._prompt_cache[prompt] = embeds
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return embeds

    def _noise(self, seed: int, dtype: torch.dtype) -> torch.Tensor:
        # The draw of Flux2KleinPipeline.prepare_latents given a generator on the device seeded with `seed`:
        # a (1, C, H, W) normal sample in the prompt embeddings' dtype, packed to (1, H*W, C).
        noise = self._noise_cache.get(seed)
        if noise is None or noise.dtype != dtype:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            shape = (1, self._latent_channels, self._latent_size, self._latent_size)
            sample = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
            noise = Flux2KleinPipeline._pack_latents(sample)
            self._noise_cache[seed] = noise
            while len(self._noise_cache) > 4 * self.prompt_cache_size:
                self._noise_cache.popitem(last=False)
        else:
            self._noise_cache.move_to_end(seed)
        return noise

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) of ``steps`` Euler steps, as Flux2KleinPipeline sets its scheduler."""
        if steps not in self._schedules:
            pipe = self.load()
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            sigmas = np.linspace(1.0, 1 / steps, steps)
            if getattr(scheduler.config, "use_flow_sigmas", False):
                sigmas = None
            mu = compute_empirical_mu(image_seq_len=self._latent_size**2, num_steps=steps)
            timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
            self._schedules[steps] = (timesteps, scheduler.sigmas.to(self.device))
        return self._schedules[steps]

    def _txt_ids(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        key = tuple(prompt_embeds.shape[:2])
        if key not in self._text_ids:
            self._text_ids[key] = Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(self.device)
        return self._text_ids[key]

    # ------------------------------------------------------------------ the denoising pass

    @torch.no_grad()
    def render_frames(
        self,
        frames: torch.Tensor,
        prompts: Sequence[str],
        *,
        steps: int,
        seeds: Sequence[int],
        mode: str = "",
    ) -> torch.Tensor:
        """Restyle uint8 RGB frames (B, 3, 512, 512): one prompt and noise seed per frame, ``steps``
        denoising steps and one mode for all. Returns float images in [0, 1], (B, 3, 512, 512), on the
        device; in the exact mode these are what Flux2KleinPipeline(..., output_type="pt") returns for the
        same inputs."""
        self.load()
        mode = mode or self.modes[0].id
        try:
            recipe = self._recipes[mode]
        except KeyError:
            raise ValueError(f"unknown mode {mode!r}; this engine has {', '.join(self._recipes)}") from None
        batch_size = frames.shape[0]
        if not (len(prompts) == len(seeds) == batch_size):
            raise ValueError(
                f"{batch_size} frames need as many prompts and seeds, got {len(prompts)}/{len(seeds)}"
            )
        if tuple(frames.shape[1:]) != (3, OUTPUT_SIZE, OUTPUT_SIZE):
            raise ValueError(
                f"frames must be (B, 3, {OUTPUT_SIZE}, {OUTPUT_SIZE}), got {tuple(frames.shape)}"
            )

        # Everything looked up per job (and cached) comes first: what follows is the frame's GPU work alone,
        # the part a CUDA graph can capture.
        # 1. Prompt embeddings, cached per prompt
        prompt_embeds = torch.cat([self.prompt_embeds(prompt) for prompt in prompts])
        if recipe.text_tokens < prompt_embeds.shape[1]:
            prompt_embeds = prompt_embeds[:, : recipe.text_tokens]
        # 2. Initial noise, fixed per seed
        noise = torch.cat([self._noise(seed, prompt_embeds.dtype) for seed in seeds])
        frames = frames.to(self.device)
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return self._denoise(frames, prompt_embeds, noise, recipe=recipe, steps=steps)
        key = (mode, steps, batch_size)
        graph = self._frame_graphs.get(key)
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            logger.info("capturing the CUDA graph of mode %s, %d steps, batch %d", *key)
            denoise = partial(self._denoise, recipe=recipe, steps=steps)
            graph = _FrameGraph(denoise, (frames, prompt_embeds, noise), pool=self._graph_pool)
            self._frame_graphs[key] = graph
        return graph(frames, prompt_embeds, noise)

    def _denoise(
        self,
        frames: torch.Tensor,
        prompt_embeds: torch.Tensor,
        noise: torch.Tensor,
        *,
        recipe: ModeRecipe,
        steps: int,
    ) -> torch.Tensor:
        """The GPU work of a frame: encode the reference, ``steps`` transformer steps, decode. Nothing here
        reads a tensor's values on the host, so it can be captured as a CUDA graph (the caches it reads
        from are filled by a first, uncaptured call)."""
        pipe = self.pipe
        assert pipe is not None
        transformer, vae = self._transformer_for(recipe), pipe.vae
        batch_size = frames.shape[0]
        text_ids = self._txt_ids(prompt_embeds)

        # 3. Reference latents of the frames. VaeImageProcessor's arithmetic: [0, 255] -> [0, 1] -> [-1, 1]
        # Looked up in (B, H, W, C) order and viewed as (B, C, H, W): the pipeline's tensor comes from an HWC
        # numpy array, so it is channels-last in memory (with a full batch stride), and convolution kernels
        # differ by memory format, so matching that layout is what makes the encoder's output identical.
        if recipe.reference_size != OUTPUT_SIZE:
            frames = _resize(frames, recipe.reference_size)
        pixels = frames.permute(0, 2, 3, 1).contiguous()
        image = self._pixel_values[pixels.long()].permute(0, 3, 1, 2)
        image_latents = pipe._encode_vae_image(image=image, generator=None)
        image_latents = Flux2KleinPipeline._pack_latents(image_latents)  # (B, 1024, C) at 512²
        image_latent_ids = self._reference_latent_ids(recipe.reference_size).expand(batch_size, -1, -1)
        latents = noise
        latent_ids = self._latent_ids.expand(batch_size, -1, -1)

        # 4. Denoising loop
        timesteps, sigmas = self._schedule(steps)
        num_latent_tokens = latents.shape[1]
        kv_cache = None
        for i, t in enumerate(timesteps):
            timestep = (t.expand(batch_size).to(latents.dtype)) / 1000
            common = {
                "timestep": timestep,
                "guidance": None,
                "encoder_hidden_states": prompt_embeds,
                "txt_ids": text_ids,
                # Passed as the pipeline passes it, so a compiled transformer sees the same call signature
                # from both and one graph serves both.
                "joint_attention_kwargs": None,
                "return_dict": False,
            }
            if not recipe.reference_kv_reuse:
                noise_pred = transformer(
                    hidden_states=torch.cat([latents, image_latents], dim=1).to(transformer.dtype),
                    img_ids=torch.cat([latent_ids, image_latent_ids], dim=1),
                    **common,
                )[0]
                noise_pred = noise_pred[:, :num_latent_tokens]
            elif kv_cache is None:
                # Flux2KleinKVPipeline's first step: reference tokens first, their K/V kept per layer; the
                # output holds the noise tokens only.
                noise_pred, kv_cache = transformer(
                    hidden_states=torch.cat([image_latents, latents], dim=1).to(transformer.dtype),
                    img_ids=torch.cat([image_latent_ids, latent_ids], dim=1),
                    kv_cache_mode="extract",
                    num_ref_tokens=image_latents.shape[1],
                    **common,
                )
            else:
                noise_pred = transformer(
                    hidden_states=latents.to(transformer.dtype),
                    img_ids=latent_ids,
                    kv_cache=kv_cache,
                    kv_cache_mode="cached",
                    **common,
                )[0]
            # FlowMatchEulerDiscreteScheduler.step, operation for operation: the update is added in float32
            # and the result cast back to the model's dtype.
            dt = sigmas[i + 1] - sigmas[i]
            latents = (latents.to(torch.float32) + dt * noise_pred).to(noise_pred.dtype)

        # 5. Decode
        latents = Flux2KleinPipeline._unpack_latents_with_ids(
            latents, latent_ids, self._latent_size, self._latent_size
        )
        latents = latents * self._bn_std + self._bn_mean
        latents = Flux2KleinPipeline._unpatchify_latents(latents)
        image = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")


class _FrameGraph:
    """One captured ``_denoise`` call. Replaying it runs every kernel of a frame with a single launch,
    reading the inputs from buffers of its own and writing the output to a buffer of its own.

    Why: a frame is ~2,000 kernels, many of them short (FP8 products, norms), and launching them from
    Python left the GPU idle ~6 ms per frame on an H200 (profiled: 37.3 ms per turbo frame, 31.4 ms of
    kernels). The captured kernels are the compiled ones; outputs match the launched ones to rounding."""

    def __init__(
        self,
        denoise: Callable[..., torch.Tensor],
        inputs: tuple[torch.Tensor, ...],
        *,
        pool: Any,
    ) -> None:
        device = inputs[0].device
        self.inputs = tuple(tensor.clone() for tensor in inputs)
        # Uncaptured calls first, on a side stream as capture requires: they compile what is not compiled
        # yet, fill the engine's caches (ids, schedules: host-to-device copies cannot be captured) and let
        # libraries allocate their workspaces.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                denoise(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's other threads may touch CUDA meanwhile (memory metrics) without
        # invalidating the capture; frames are only ever rendered by one thread.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = denoise(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, tensor in zip(self.inputs, inputs, strict=True):
            buffer.copy_(tensor)
        self.graph.replay()
        # A copy: the next replay overwrites the output buffer.
        return self.output.clone()


class Float8Linear(torch.nn.Module):
    """A bias-free or biased ``nn.Linear`` computed in FP8: ``x @ W.T (+ b)`` with W stored as e4m3 with one
    float32 scale per output channel, and x quantized per row (token) at each call. ``torch._scaled_mm``
    multiplies the FP8 operands and applies both scales to the float32 accumulator."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.float32)
        scale = (weight.abs().amax(dim=1, keepdim=True) / FLOAT8_MAX).clamp(min=1e-12)
        self.register_buffer("weight_fp8", (weight / scale).to(FLOAT8))
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out_features)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = (rows.abs().amax(dim=1, keepdim=True).to(torch.float32) / FLOAT8_MAX).clamp(min=1e-12)
        quantized = (rows.to(torch.float32) / scale).to(FLOAT8)
        # _scaled_mm wants the second operand column-major: the transpose of the row-major weight is.
        out = torch._scaled_mm(
            quantized, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_transformer_fp8(transformer: torch.nn.Module) -> int:
    """Replace the linear layers inside the transformer blocks by Float8Linear, in place; returns how many.

    Only the blocks: they hold nearly all of the FLOPs, with thousands of tokens per product. The input
    and output projections and the timestep/modulation layers (one row per image) stay in bf16."""
    replaced = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                # FP8 matrix products need both dimensions divisible by 16.
                if (
                    isinstance(child, torch.nn.Linear)
                    and child.in_features % 16 == child.out_features % 16 == 0
                ):
                    parent._modules[name] = Float8Linear(child)
                    replaced += 1
    return replaced


def create_flux2_engine(**options: Any) -> Flux2Engine:
    """The engine registry's factory; ``options`` are Flux2Engine's keyword options (module docstring).
    Returns at once: weights are loaded by ``warm_up()`` (or the first ``render()``)."""
    return Flux2Engine(**options)


def _group_jobs(
    jobs: Sequence[FrameJob], default_mode: str, default_steps: int
) -> dict[tuple[str, int], list[int]]:
    """Job indices by (mode, steps): one transformer batch each, since their schedules and graphs differ."""
    groups: dict[tuple[str, int], list[int]] = {}
    for index, job in enumerate(jobs):
        key = (job.mode or default_mode, job.steps if job.steps > 0 else default_steps)
        groups.setdefault(key, []).append(index)
    return groups


def _use_kv_attention(transformer: Flux2Transformer2DModel) -> None:
    """Give the transformer the attention processors that can extract and reuse reference K/V (as
    Flux2KleinKVPipeline does). Called without K/V arguments they compute what the default ones do."""
    for block in transformer.transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVAttnProcessor):
            block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVParallelSelfAttnProcessor):
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


def _center_square(frame: torch.Tensor) -> torch.Tensor:
    """Center-crop a uint8 (3, H, W) frame to a square and resize it to OUTPUT_SIZE² on its device."""
    _, height, width = frame.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frame = frame[:, top : top + side, left : left + side]
    if side == OUTPUT_SIZE:
        return frame
    return _resize(frame[None], OUTPUT_SIZE)[0]


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) frames resized to size² (bilinear, antialiased), on their device."""
    resized = F.interpolate(frames.to(torch.float32), size=(size, size), mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _gradient_frame(device: torch.device) -> torch.Tensor:
    """A smooth synthetic uint8 frame (1, 3, 512, 512) for warm-up renders."""
    ramp = torch.linspace(0, 255, OUTPUT_SIZE, device=device)
    red = ramp.view(1, -1).expand(OUTPUT_SIZE, -1)
    green = ramp.view(-1, 1).expand(-1, OUTPUT_SIZE)
    blue = torch.full_like(red, 128.0)
    return torch.stack([red, green, blue]).round().to(torch.uint8)[None]
