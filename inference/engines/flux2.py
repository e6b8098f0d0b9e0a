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

Modes (``mode=``):

* ``"exact"`` (default): the same arithmetic as calling ``Flux2KleinPipeline`` with the same weights,
  frame, prompt and ``generator=torch.Generator(device).manual_seed(seed)``; on the same device and
  without compilation the output tensors are bit-identical (tests check this). This is the correctness
  gate for every speed-up.
* ``"approximate"``: allows the options that change the model's arithmetic for speed (``fp8``,
  ``text_tokens``). Their outputs differ from the pipeline's by more than rounding;
  ``python -m inference.bench`` reports by how much.

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
``mode``
    ``"exact"`` or ``"approximate"`` (see above).
``fp8``
    Approximate. The transformer blocks' linear layers multiply in FP8 (e4m3) on the tensor cores:
    weights quantized once with one scale per output channel, activations per token on the fly,
    float32 accumulation (``torch._scaled_mm``). Needs a GPU with FP8 (Hopper or newer) to be fast.
``text_tokens``
    Approximate below 512. How many prompt-embedding tokens the transformer attends to. The pipeline
    pads every prompt to 512 tokens and the transformer attends to the padding too; the text encoder is
    causal, so the first ``text_tokens`` embeddings are unchanged by dropping the rest, but the
    transformer's output changes (and prompts longer than ``text_tokens``, chat template included,
    are cut).
``compile``
    ``torch.compile`` the transformer and the VAE's encoder and decoder; default (None): on CUDA yes,
    on CPU no. On an H200 it brings a frame at 2 / 4 steps to 74 / 136 ms (the compiled baseline
    pipeline: 104 / 169 ms), and ``warm_up()`` then takes ~2.7 minutes (one compilation per batch
    size; docs/performance.md). Compiled
    kernels round differently from eager ones, so outputs move by rounding-level amounts (as those of
    a compiled Flux2KleinPipeline do); the math stays the pipeline's.
``fuse_qkv``
    Fuse the double-stream blocks' q/k/v projections (image and text streams) into one matrix product
    each (default False); the same products, computed by one kernel instead of three.
``compile_mode``
    ``torch.compile`` mode of the transformer: None (default) or ``"reduce-overhead"`` (CUDA graphs;
    the transformer's output buffer is reused by the next call, which the denoising loop allows).
``prompt_cache_size``
    How many prompts' embeddings to keep (default 32; about 8 MB each at klein-4B size in bf16).
``jpeg_quality``
    Quality of the output JPEGs (default 90).
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from inference.engines.base import OUTPUT_SIZE, FrameJob
from inference.engines.klein_config import (
    KLEIN_4B,
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_OUT_LAYERS,
    TINY,
    build_random_components,
)

try:  # nvJPEG decode/encode on the GPU; the CPU-only install has no torchvision and uses Pillow.
    import torchvision.io as tvio
except ImportError:  # pragma: no cover - depends on the install
    tvio = None

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "black-forest-labs/FLUX.2-klein-4B"
MODES = ("exact", "approximate")
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
        mode: str = "exact",
        compile: bool | None = None,
        compile_mode: str | None = None,
        fuse_qkv: bool = False,
        fp8: bool = False,
        text_tokens: int = MAX_SEQUENCE_LENGTH,
        prompt_cache_size: int = 32,
        jpeg_quality: int = 90,
        pipeline: Flux2KleinPipeline | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 1 <= text_tokens <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"text_tokens must be in 1..{MAX_SEQUENCE_LENGTH}, got {text_tokens}")
        if mode == "exact" and (fp8 or text_tokens != MAX_SEQUENCE_LENGTH):
            raise ValueError("fp8 and text_tokens < 512 change the output: they need mode='approximate'")
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
        self.mode = mode
        self.fp8 = fp8
        self.text_tokens = text_tokens
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.compile_mode = compile_mode
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
        # One reference image per job, at time coordinate 10 as Flux2KleinPipeline places the first one.
        self._image_latent_ids = Flux2KleinPipeline._prepare_image_ids(
            [torch.empty(shape, device="meta")]
        ).to(self.device)
        # The frame normalisation of VaeImageProcessor (x / 255 * 2 - 1 in float32, then the VAE's dtype) as
        # a table of its 256 possible results, computed on the CPU as the pipeline computes them. On CUDA,
        # dividing by a scalar is done as a multiplication by its reciprocal, which rounds differently.
        levels = torch.arange(256, dtype=torch.float32) / 255.0
        self._pixel_values = (2.0 * levels - 1.0).to(vae.dtype).to(self.device)
        if self.fuse_qkv_projections:
            self.fuse_qkv()
        if self.fp8:
            self.enable_fp8()
        if self.compile:
            self.compile_components(transformer_mode=self.compile_mode)

    def enable_fp8(self) -> None:
        """Quantize the transformer blocks to FP8 in place (the ``fp8`` option; approximate)."""
        pipe = self.load() if self.pipe is None else self.pipe
        if not any(isinstance(module, Float8Linear) for module in pipe.transformer.modules()):
            quantize_transformer_fp8(pipe.transformer)
        self.fp8 = True

    def fuse_qkv(self) -> None:
        """Fuse the transformer's q/k/v projections in place (diffusers' ``fuse_qkv_projections``)."""
        pipe = self.load() if self.pipe is None else self.pipe
        pipe.transformer.fuse_qkv_projections()

    def compile_components(
        self, *, transformer: bool = True, vae: bool = True, transformer_mode: str | None = None
    ) -> None:
        """``torch.compile`` the transformer and/or the VAE encoder and decoder in place (compilation itself
        happens in the first call of each input shape). Compiling a module again replaces its compilation."""
        pipe = self.load() if self.pipe is None else self.pipe
        if transformer:
            pipe.transformer.compile(fullgraph=True, dynamic=False, mode=transformer_mode)
        if vae:
            # The VAE runs once per frame each way; GroupNorm at batch 1 is where eager PyTorch loses most
            # (one thread block per group), and a compiled reduction does not.
            pipe.vae.encoder.compile(fullgraph=True, dynamic=False)
            pipe.vae.decoder.compile(fullgraph=True, dynamic=False)

    # ------------------------------------------------------------------ the Engine protocol

    def warm_up(self) -> None:
        """Load the weights and render throw-away frames through ``render()`` (JPEG codecs included): the
        first call allocates workspaces, and with ``compile`` each batch size is its own compiled graph
        (tens of seconds each on a GPU), so every size up to ``max_batch`` is compiled here rather than
        on a live frame."""
        self.load()
        jpeg = self.encode_jpegs(_gradient_frame(self.device).to(torch.float32) / 255)[0]
        for size in range(1, self.max_batch + 1) if self.compile else [1]:
            self.render([FrameJob("warm-up", 0, jpeg, "warm-up", self.steps, seed) for seed in range(size)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        """One 512x512 JPEG per job, in order."""
        if len(jobs) > self.max_batch:
            raise ValueError(f"render() accepts at most {self.max_batch} jobs, got {len(jobs)}")
        if not jobs:
            return []
        self.load()
        frames = self.decode_frames([job.jpeg for job in jobs])
        images: list[torch.Tensor | None] = [None] * len(jobs)
        for steps, indices in _group_by_steps(jobs, self.steps).items():
            rendered = self.render_frames(
                frames[indices],
                [jobs[i].prompt for i in indices],
                steps=steps,
                seeds=[jobs[i].seed for i in indices],
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
        self, frames: torch.Tensor, prompts: Sequence[str], *, steps: int, seeds: Sequence[int]
    ) -> torch.Tensor:
        """Restyle uint8 RGB frames (B, 3, 512, 512): one prompt and noise seed per frame, ``steps``
        denoising steps for all. Returns float images in [0, 1], (B, 3, 512, 512), on the device; these
        are what Flux2KleinPipeline(..., output_type="pt") returns for the same inputs."""
        pipe = self.load()
        transformer, vae = pipe.transformer, pipe.vae
        batch_size = frames.shape[0]
        if not (len(prompts) == len(seeds) == batch_size):
            raise ValueError(
                f"{batch_size} frames need as many prompts and seeds, got {len(prompts)}/{len(seeds)}"
            )
        if tuple(frames.shape[1:]) != (3, OUTPUT_SIZE, OUTPUT_SIZE):
            raise ValueError(
                f"frames must be (B, 3, {OUTPUT_SIZE}, {OUTPUT_SIZE}), got {tuple(frames.shape)}"
            )

        # 1. Prompt embeddings, cached per prompt
        prompt_embeds = torch.cat([self.prompt_embeds(prompt) for prompt in prompts])
        if self.text_tokens < prompt_embeds.shape[1]:
            prompt_embeds = prompt_embeds[:, : self.text_tokens]  # approximate mode only
        text_ids = self._txt_ids(prompt_embeds)

        # 2. Reference latents of the frames. VaeImageProcessor's arithmetic: [0, 255] -> [0, 1] -> [-1, 1]
        # Looked up in (B, H, W, C) order and viewed as (B, C, H, W): the pipeline's tensor comes from an HWC
        # numpy array, so it is channels-last in memory (with a full batch stride), and convolution kernels
        # differ by memory format, so matching that layout is what makes the encoder's output identical.
        pixels = frames.to(self.device).permute(0, 2, 3, 1).contiguous()
        image = self._pixel_values[pixels.long()].permute(0, 3, 1, 2)
        image_latents = pipe._encode_vae_image(image=image, generator=None)
        image_latents = Flux2KleinPipeline._pack_latents(image_latents)  # (B, 1024, C)
        image_latent_ids = self._image_latent_ids.expand(batch_size, -1, -1)

        # 3. Initial noise, fixed per seed
        latents = torch.cat([self._noise(seed, prompt_embeds.dtype) for seed in seeds])
        latent_ids = self._latent_ids.expand(batch_size, -1, -1)
        latent_image_ids = torch.cat([latent_ids, image_latent_ids], dim=1)

        # 4. Denoising loop
        timesteps, sigmas = self._schedule(steps)
        num_latent_tokens = latents.shape[1]
        for i, t in enumerate(timesteps):
            timestep = t.expand(batch_size).to(latents.dtype)
            latent_model_input = torch.cat([latents, image_latents], dim=1).to(transformer.dtype)
            noise_pred = transformer(
                hidden_states=latent_model_input,
                timestep=timestep / 1000,
                guidance=None,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=latent_image_ids,
                # Passed as the pipeline passes it, so a compiled transformer sees the same call signature
                # from both and one graph serves both.
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]
            noise_pred = noise_pred[:, :num_latent_tokens]
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


def _group_by_steps(jobs: Sequence[FrameJob], default_steps: int) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.steps if job.steps > 0 else default_steps, []).append(index)
    return groups


def _center_square(frame: torch.Tensor) -> torch.Tensor:
    """Center-crop a uint8 (3, H, W) frame to a square and resize it to OUTPUT_SIZE² on its device."""
    _, height, width = frame.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frame = frame[:, top : top + side, left : left + side]
    if side == OUTPUT_SIZE:
        return frame
    resized = F.interpolate(
        frame[None].to(torch.float32), size=(OUTPUT_SIZE, OUTPUT_SIZE), mode="bilinear", antialias=True
    )
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def _gradient_frame(device: torch.device) -> torch.Tensor:
    """A smooth synthetic uint8 frame (1, 3, 512, 512) for warm-up renders."""
    ramp = torch.linspace(0, 255, OUTPUT_SIZE, device=device)
    red = ramp.view(1, -1).expand(OUTPUT_SIZE, -1)
    green = ramp.view(-1, 1).expand(-1, OUTPUT_SIZE)
    blue = torch.full_like(red, 128.0)
    return torch.stack([red, green, blue]).round().to(torch.uint8)[None]
