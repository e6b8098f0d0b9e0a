"""The flux2 engine's render path: webcam frames restyled by FLUX.2 [klein] through diffusers' components.

Each frame conditions generation as a reference image, exactly as ``Flux2KleinPipeline`` does: the frame is
VAE-encoded and its latent tokens are appended after the noise tokens, and a few distilled Euler steps turn
seeded noise into the output image. Per frame the engine runs only the VAE encoder, the transformer steps
and the VAE decoder; what depends on the session rather than the frame is computed once and cached: the
prompt's embedding (one text-encoder pass per distinct prompt), the initial noise of the session's seed
(the same for all its frames, which keeps a live stream temporally stable), the timestep schedule per step
count, position ids and the VAE's latent statistics.

Jobs of one ``render()`` call are stacked into one transformer batch even when their prompts differ; jobs
with different modes or step counts go in separate batches. In the ``exact`` mode, on the same device and
without compilation, the output tensors are bit-identical to the pipeline's with the same weights, frame,
prompt and ``generator=torch.Generator(device).manual_seed(seed)``: the correctness gate for every
speed-up.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from inference.engines.base import FrameJob
from inference.engines.flux2.checkpoint import PendingTextEncoder, TextEncoderMove, build_pipeline
from inference.engines.flux2.compiled import (
    compile_collections_left_to_the_pause,
    compile_vae,
    prefetch_compile_keys,
)
from inference.engines.flux2.config import Flux2Config
from inference.engines.flux2.cuda_graphs import FrameGraphs, batch_rows
from inference.engines.flux2.decoders import build_decoders, compile_decoder
from inference.engines.flux2.frames import decode_jpegs, encode_jpegs, gradient_frame, resize
from inference.engines.flux2.klein_config import MAX_SEQUENCE_LENGTH
from inference.engines.flux2.kv_reuse import ReferenceKV, merge, reference_kv, stack_kv
from inference.engines.flux2.lora import load_adapters, prompt_with_trigger
from inference.engines.flux2.prompts import PromptEncoder, keep_embedding_layers
from inference.engines.flux2.recipes import ModeRecipe, offered_modes
from inference.engines.flux2.style import StyleKV, StyleLatents, style_reference_ids
from inference.engines.flux2.transformer import Transformers, predict
from inference.protocol import MAX_STEPS, MIN_STEPS, OUTPUT_SIZE, RenderMode
from inference.style_image import StyleImage, style_image_from_pixels

logger = logging.getLogger(__name__)

# The prompt of the throw-away frames that warm the engine up.
WARM_UP_PROMPT = "warm-up"


class Conditioning(NamedTuple):
    """What each row of a batch is rendered from besides its frame, taken from its job. Tensors only, so
    that a captured CUDA graph can take them as inputs."""

    prompt_embeds: torch.Tensor  # (B, text tokens, joint_attention_dim): the job's prompt
    noise: torch.Tensor  # (B, latent tokens, C): the initial noise of the job's seed


class Flux2Engine:
    """Renders batches of webcam frames with FLUX.2 [klein], as ``config`` says (``Flux2Config``).

    ``pipeline``: components already in memory (the bench shares one set of weights between engines);
    otherwise ``load()`` builds or downloads them as the config says."""

    name = "flux2"

    def __init__(
        self, config: Flux2Config | None = None, *, pipeline: Flux2KleinPipeline | None = None
    ) -> None:
        self.config = config = config or Flux2Config()
        offered = offered_modes(config.modes, config.custom_modes)
        self.modes: tuple[RenderMode, ...] = tuple(mode for mode, _ in offered.values())
        self._recipes: dict[str, ModeRecipe] = {mode_id: recipe for mode_id, (_, recipe) in offered.items()}
        self.model = config.model_label
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        # The scheduler reads max_batch per batch, and the bench changes it (and cuda_graphs) between cases.
        self.max_batch = config.max_batch
        self.compile = self.device.type == "cuda" if config.compile is None else config.compile
        self.cuda_graphs = self.compile if config.cuda_graphs is None else config.cuda_graphs

        self.pipe: Flux2KleinPipeline | None = None
        self._staged: Flux2KleinPipeline | None = None  # weights read by load_on_cpu(), not yet moved
        # The text encoder still on its way beside the rest (checkpoint.py); None once joined.
        self.text_encoder_load: PendingTextEncoder | None = None
        self.transformers: Transformers | None = None
        # The LoRA adapters sessions may choose (loaded with the weights; the worker's `ready` lists them).
        self.adapters = tuple(spec.info() for spec in config.loras)
        self.decoders: dict[str, torch.nn.Module] = {}  # the small/tiny decoders the modes use, by name
        self._load_lock = threading.Lock()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_encoder: PromptEncoder | None = None  # built with the text encoder's first prompt
        self._noise_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_ids: dict[tuple[int, ...], torch.Tensor] = {}
        self._reference_ids: dict[int, torch.Tensor] = {}
        self._style_ids: dict[tuple[int, int], torch.Tensor] = {}
        self.styles = StyleLatents(self._encode_style, self.device)
        self.style_kv = StyleKV()
        self._warm_modes: set[str] = set()
        self._frame_graphs = FrameGraphs()
        if pipeline is not None:
            self._attach(pipeline)

    # ------------------------------------------------------------------ loading

    def load(self) -> Flux2KleinPipeline:
        """Build or load the pipeline's components on the device (once); after ``load_on_cpu()``, the
        weights already in host memory are moved there instead."""
        with self._load_lock:
            if self.pipe is None:
                if self.compile:
                    prefetch_compile_keys()  # beside the loading and the warm-up's tracing
                staged, self._staged = self._staged, None
                if staged is not None:
                    # The text encoder crosses beside the warm-up, as a checkpoint's is read beside it, and
                    # only once the other weights are there: copies from pageable host memory share one
                    # link, so crossing beside them would delay the transformer the warm-up starts with.
                    text_encoder = staged.text_encoder
                    staged.register_modules(text_encoder=None)
                    self._attach(staged.to(self.device))
                    if text_encoder is not None:
                        self.text_encoder_load = TextEncoderMove(text_encoder, self.device)
                else:
                    pipe, self.text_encoder_load = build_pipeline(self.config, self.device, self.dtype)
                    self._attach(pipe)
            assert self.pipe is not None
            return self.pipe

    def _with_text_encoder(self) -> Flux2KleinPipeline:
        """The pipeline with its text encoder and tokenizer, waiting for them if they are still loading."""
        pipe = self.load()
        with self._load_lock:
            if self.text_encoder_load is not None:
                self.text_encoder_load.attach_to(pipe)
                self.text_encoder_load = None
        return pipe

    def load_on_cpu(self) -> None:
        """Read the weights into host memory without touching the device, for ``load()`` to move later: what
        a memory snapshot (modal_app.py, MODAL_SNAPSHOT) captures, since no GPU is attached while one is
        taken."""
        with self._load_lock:
            if self.pipe is None and self._staged is None:
                if self.compile:
                    prefetch_compile_keys(wait=True)  # the snapshot holds them too
                pipe, text = build_pipeline(self.config, torch.device("cpu"), self.dtype)
                if text is not None:  # a snapshot holds all of it
                    text.attach_to(pipe)
                keep_embedding_layers(pipe.text_encoder)  # a smaller snapshot: none of what no prompt reads
                self._staged = pipe

    def _attach(self, pipe: Flux2KleinPipeline) -> None:
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self._prompt_encoder = None
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.styles = StyleLatents(self._encode_style, self.device)
        self.style_kv = StyleKV()
        vae = pipe.vae
        # Patched-latent geometry of an OUTPUT_SIZE² frame: VAE downsampling x 2x2 patches.
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
        if self.config.fuse_qkv:
            pipe.transformer.fuse_qkv_projections()
        lora = None
        if self.config.loras:
            lora = load_adapters(
                pipe,
                self.config.loras,
                cache_dir=self.config.cache_dir,
                local_files_only=self.config.local_files_only,
            )
        self.transformers = Transformers(
            pipe.transformer, self._recipes.values(), lora=lora, max_batch=self.config.max_batch
        )
        config = self.config
        self.decoders = build_decoders(
            [recipe.decoder for recipe in self._recipes.values()],
            model_vae=vae,
            bn_mean=self._bn_mean,
            bn_std=self._bn_std,
            sources={"small": config.small_decoder, "tiny": config.tiny_decoder},
            random_weights=config.random_weights or config.tiny,
            seed=config.weights_seed,
            cache_dir=config.cache_dir,
            local_files_only=config.local_files_only,
        )
        if self.compile:
            for decoder in self.decoders.values():
                compile_decoder(decoder)
            self.transformers.compile(
                scope=self.config.compile_scope,
                whole_graph_recipes=[
                    self._recipes[mode] for mode in self.config.whole_graph_modes if mode in self._recipes
                ],
            )
            compile_vae(vae)

    @property
    def replays_graphs(self) -> bool:
        """Whether GPU passes are captured and replayed as CUDA graphs (cuda_graphs.py) on this device."""
        return self.cuda_graphs and self.device.type == "cuda"

    # ------------------------------------------------------------------ the Engine protocol

    def warm_up(self) -> None:
        """Load the weights and warm the default mode, which is all the first frame needs; the other modes
        are ``deferred_warm_ups()``. Warming renders throw-away frames through ``render()`` (JPEG codecs
        included): the first call allocates workspaces, and with ``compile`` each mode's transformer calls
        compile on first use (seconds from a warm compile cache, tens of seconds from an empty one), once
        for batch size 1 and once for a symbolic batch size that serves the rest. The first frame comes
        alone, so only batch size 1 is warmed here; the larger batches of the default mode are a deferred
        task too.

        The text encoder may still be loading meanwhile (checkpoint.py): the throw-away frames then take a
        stand-in embedding of the right shape, since compiling and capturing depend on shapes only. The
        warm-up returns once the text encoder is loaded and has encoded a prompt, so a worker whose text
        encoder cannot load fails to start."""
        self.load()
        with compile_collections_left_to_the_pause():
            with self._warm_up_embedding():
                self.warm_up_mode(self.modes[0].id, batch_sizes=(1,))
            # A real prompt, so that its pass is captured (prompts.py) before a session's first prompt.
            self.prompt_embeds(WARM_UP_PROMPT)

    @contextmanager
    def _warm_up_embedding(self) -> Iterator[None]:
        load = self.text_encoder_load
        if load is None or load.done():
            yield
            return
        assert self.pipe is not None
        width = self.pipe.transformer.config.joint_attention_dim
        stand_in = torch.zeros(1, MAX_SEQUENCE_LENGTH, width, device=self.device, dtype=self.dtype)
        self._prompt_cache[WARM_UP_PROMPT] = stand_in
        try:
            yield
        finally:
            if self._prompt_cache.get(WARM_UP_PROMPT) is stand_in:
                del self._prompt_cache[WARM_UP_PROMPT]

    def deferred_warm_ups(self) -> list[Callable[[], None]]:
        """Tasks for the scheduler to run while no frame is waiting: one per mode not warmed yet (a mode
        chosen before its task ran compiles on its first frame instead, once), then, with CUDA graphs, one
        per other step count of each mode, so that changing steps mid-stream does not wait for a capture."""
        cold = [mode.id for mode in self.modes if mode.id not in self._warm_modes]
        tasks = [partial(self.warm_up_mode, mode) for mode in cold]
        if self.replays_graphs:
            tasks += [
                partial(self._capture_graph, mode.id, steps)
                for mode in self.modes
                for steps in range(MIN_STEPS, MAX_STEPS + 1)
            ]
        if self.compile:
            # A style image adds reference tokens: another shape for the compiled transformer, compiled
            # here rather than on the first styled frame, which would stall every session meanwhile.
            tasks += [partial(self._warm_up_style, mode.id) for mode in self.modes]
        return tasks

    def _warm_up_style(self, mode: str) -> None:
        # The warm-up frame's gradient, flipped, as a throw-away style image (OUTPUT_SIZE == its size).
        style = style_image_from_pixels(gradient_frame(torch.device("cpu"))[0].permute(2, 1, 0).numpy())
        steps = max(2, self.config.steps)
        jpeg = self._warm_up_jpeg()
        self.render([FrameJob("warm-up", 0, jpeg, WARM_UP_PROMPT, steps, 0, mode, style=style)])

    def warm_up_mode(self, mode: str, batch_sizes: Sequence[int] | None = None) -> None:
        """Render throw-away frames of ``mode`` at each batch size that compiles a graph of its own (those
        of ``batch_sizes`` only, when given); the mode counts as warm once all of them ran."""
        if mode in self._warm_modes:
            return
        jpeg = self._warm_up_jpeg()
        every = sorted({1, min(2, self.max_batch), self.max_batch}) if self.compile else [1]
        sizes = [size for size in every if batch_sizes is None or size in batch_sizes]
        # At least 2 steps: reference K/V reuse runs a different transformer call from the second step on.
        steps = max(2, self.config.steps)
        for size in sizes:
            jobs = [FrameJob("warm-up", 0, jpeg, WARM_UP_PROMPT, steps, seed, mode) for seed in range(size)]
            self.render(jobs)
            if size > 1 and self.adapters:
                # Rows with different adapters run the LoRA branches, a graph of their own: warmed here so a
                # second session choosing another adapter never waits for a compilation.
                self.render([replace(jobs[0], adapter=self.adapters[0].name, adapter_scale=1.0), *jobs[1:]])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if sizes == every:
            self._warm_modes.add(mode)

    def _capture_graph(self, mode: str, steps: int) -> None:
        if (mode, steps, 1) not in self._frame_graphs:
            self.render([FrameJob("warm-up", 0, self._warm_up_jpeg(), WARM_UP_PROMPT, steps, 0, mode)])

    def _warm_up_jpeg(self) -> bytes:
        return self.encode_jpegs(gradient_frame(self.device).to(torch.float32) / 255)[0]

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        """One OUTPUT_SIZE² JPEG per job, in order: the frames decoded, rendered in one batch per (mode,
        steps, with or without a style image), encoded."""
        if len(jobs) > self.max_batch:
            raise ValueError(f"render() accepts at most {self.max_batch} jobs, got {len(jobs)}")
        if not jobs:
            return []
        self.load()
        groups = _group_jobs(jobs, self.modes[0].id, self.config.steps)
        for mode, _, _ in groups:
            self._recipe(mode)
        frames = self.decode_frames([job.jpeg for job in jobs])
        images: list[torch.Tensor | None] = [None] * len(jobs)
        for (mode, steps, styled), indices in groups.items():
            rendered = self.render_frames(
                frames[indices],
                [self._job_prompt(jobs[i]) for i in indices],
                steps=steps,
                seeds=[jobs[i].seed for i in indices],
                mode=mode,
                styles=[jobs[i].style for i in indices] if styled else None,  # type: ignore[misc]
                adapters=[jobs[i].adapter for i in indices],
                adapter_scales=[jobs[i].adapter_scale for i in indices],
            )
            for row, index in enumerate(indices):
                images[index] = rendered[row]
        return self.encode_jpegs(torch.stack(images))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ the render path

    @torch.no_grad()
    def render_frames(
        self,
        frames: torch.Tensor,
        prompts: Sequence[str],
        *,
        steps: int,
        seeds: Sequence[int],
        mode: str = "",
        styles: Sequence[StyleImage] | None = None,
        adapters: Sequence[str | None] | None = None,
        adapter_scales: Sequence[float | None] | None = None,
    ) -> torch.Tensor:
        """Restyle uint8 RGB frames (B, 3, 512, 512): one prompt and noise seed per frame, ``steps``
        denoising steps and one mode for all; ``styles``: one style image per frame, or None for none.
        Returns float images in [0, 1], (B, 3, 512, 512), on the device; in the exact mode these are what
        Flux2KleinPipeline(image=[frame] or [frame, style], ..., output_type="pt") returns for the same
        inputs."""
        self.load()
        mode = mode or self.modes[0].id
        recipe = self._recipe(mode)
        batch_size = frames.shape[0]
        if not (len(prompts) == len(seeds) == batch_size):
            raise ValueError(
                f"{batch_size} frames need as many prompts and seeds, got {len(prompts)}/{len(seeds)}"
            )
        if styles is not None and len(styles) != batch_size:
            raise ValueError(f"{batch_size} frames need as many style images, got {len(styles)}")
        if tuple(frames.shape[1:]) != (3, OUTPUT_SIZE, OUTPUT_SIZE):
            raise ValueError(
                f"frames must be (B, 3, {OUTPUT_SIZE}, {OUTPUT_SIZE}), got {tuple(frames.shape)}"
            )
        # Everything looked up per job (and cached) comes first: what follows is the frame's GPU work alone,
        # the part a CUDA graph can capture.
        conditioning: tuple[torch.Tensor, ...] = self._conditioning(prompts, seeds, recipe)
        frames = frames.to(self.device)
        adapters = list(adapters) if adapters is not None else [None] * batch_size
        adapter_scales = list(adapter_scales) if adapter_scales is not None else [None] * batch_size
        branches = self._select_adapters(batch_size, adapters, adapter_scales, recipe)
        if styles is not None:
            # Encoded once per style image (and size), on the first frame that carries it; under
            # style_kv_once its keys and values too, by the weights the rows' adapters left in place.
            if recipe.style_kv_once:
                keys = [
                    (recipe.fp8, recipe.reference_size, recipe.style_size, adapter, scale)
                    for adapter, scale in zip(adapters, adapter_scales, strict=True)
                ]
                compute = partial(self._style_kv, styles, recipe, conditioning[0])
                conditioning = (*conditioning, self.style_kv.batch(styles, keys, compute))
            else:
                conditioning = (*conditioning, self.styles.batch(styles, recipe.style_size))
        if not self.replays_graphs:
            return self._denoise(frames, *conditioning, recipe=recipe, steps=steps)
        denoise = partial(self._denoise, recipe=recipe, steps=steps)
        # A batch whose rows take different adapters runs the low-rank branches: other kernels, another
        # graph. A fused adapter is in the weights the plain graph reads, so it replays that one.
        graph_mode = mode + ("+style" if styles is not None else "") + ("+lora" if branches else "")
        return self._frame_graphs.replay((graph_mode, steps, batch_size), denoise, (frames, *conditioning))

    def _conditioning(self, prompts: Sequence[str], seeds: Sequence[int], recipe: ModeRecipe) -> Conditioning:
        # 1. The prompts' embeddings (cached per prompt), cut to the tokens the recipe attends to
        prompt_embeds = batch_rows([self.prompt_embeds(prompt) for prompt in prompts])
        if recipe.text_tokens < prompt_embeds.shape[1]:
            prompt_embeds = prompt_embeds[:, : recipe.text_tokens]
        # 2. The initial noise, fixed per seed
        noise = batch_rows([self._noise(seed, prompt_embeds.dtype) for seed in seeds])
        return Conditioning(prompt_embeds, noise)

    def _denoise(
        self,
        frames: torch.Tensor,
        prompt_embeds: torch.Tensor,
        noise: torch.Tensor,
        style: torch.Tensor | None = None,
        *,
        recipe: ModeRecipe,
        steps: int,
    ) -> torch.Tensor:
        """The GPU work of a frame: encode the reference, ``steps`` transformer steps, decode. ``style``:
        the rows' style image as the second reference image, its latents (B, tokens, C), or under
        ``recipe.style_kv_once`` its keys and values (``kv_reuse.stack_kv``'s form). Nothing here
        reads a tensor's values on the host, so it can be captured as a CUDA graph (the caches it reads
        from are filled by a first, uncaptured call)."""
        assert self.transformers is not None
        transformer = self.transformers.for_denoising(recipe)
        batch_size = frames.shape[0]
        timesteps, sigmas = self._schedule(steps)
        text_ids = self._txt_ids(prompt_embeds)

        def text(t: torch.Tensor) -> dict[str, Any]:
            return self._text_kwargs(prompt_embeds, text_ids, t.expand(batch_size).to(noise.dtype) / 1000)

        # 3. The frames, encoded as the reference image
        reference, reference_ids = self._encode_reference(frames, recipe.reference_size)
        reuse = ReferenceKV() if recipe.reference_kv_reuse else None
        if style is not None and recipe.style_kv_once:
            # The frame's keys and values alone, joined with the style image's (computed once per image):
            # every step then runs on the noise and text tokens only.
            frame_kv = reference_kv(transformer, reference, reference_ids, text(timesteps[0]))
            reuse = ReferenceKV(merge(frame_kv, style))
        elif style is not None:
            # The pipeline's order: noise tokens, then the frame's, then the style image's. Under reference
            # K/V reuse both references' keys and values are computed once per frame, for all steps.
            style_ids = self._style_reference_ids(recipe.reference_size, recipe.style_size)
            reference = torch.cat([reference, style.to(reference.dtype)], dim=1)
            reference_ids = torch.cat([reference_ids, style_ids.expand(batch_size, -1, -1)], dim=1)
        latents = noise
        latent_ids = self._latent_ids.expand(batch_size, -1, -1)

        # 4. Denoising loop
        for i, t in enumerate(timesteps):
            if reuse is None:
                noise_pred = predict(transformer, latents, latent_ids, reference, reference_ids, text(t))
            else:
                noise_pred = reuse.predict(
                    transformer, latents, latent_ids, reference, reference_ids, text(t)
                )
            # FlowMatchEulerDiscreteScheduler.step, operation for operation: the update is added in float32
            # and the result cast back to the model's dtype.
            dt = sigmas[i + 1] - sigmas[i]
            latents = (latents.to(torch.float32) + dt * noise_pred).to(noise_pred.dtype)

        # 5. Decode
        return self._decode(latents, latent_ids, recipe.decoder)

    @staticmethod
    def _text_kwargs(
        prompt_embeds: torch.Tensor, text_ids: torch.Tensor, timestep: torch.Tensor
    ) -> dict[str, Any]:
        """The transformer's keyword arguments besides the image tokens, for one step at ``timestep``."""
        return {
            "timestep": timestep,
            "guidance": None,
            "encoder_hidden_states": prompt_embeds,
            "txt_ids": text_ids,
            # Passed as the pipeline passes it, so a compiled transformer sees the same call signature
            # from both and one graph serves both.
            "joint_attention_kwargs": None,
            "return_dict": False,
        }

    def _style_kv(
        self, styles: Sequence[StyleImage], recipe: ModeRecipe, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """The rows' style images' reference keys and values, each image's tokens attending only to
        themselves (``recipe.style_kv_once``), by the weights the recipe's transformer holds now."""
        assert self.transformers is not None
        transformer = self.transformers.for_recipe(recipe)
        latents = self.styles.batch(styles, recipe.style_size)
        ids = self._style_reference_ids(recipe.reference_size, recipe.style_size).expand(len(styles), -1, -1)
        # Reference tokens are modulated by their own fixed timestep: the one given here changes nothing.
        timestep = torch.zeros(len(styles), dtype=prompt_embeds.dtype, device=self.device)
        text = self._text_kwargs(prompt_embeds, self._txt_ids(prompt_embeds), timestep)
        return stack_kv(reference_kv(transformer, latents, ids, text))

    def _encode_reference(self, frames: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames (B, 3, 512, 512) as reference-image latent tokens (B, tokens, C), encoded at size²,
        and their position ids."""
        assert self.pipe is not None
        # VaeImageProcessor's arithmetic: [0, 255] -> [0, 1] -> [-1, 1], looked up in (B, H, W, C) order and
        # viewed as (B, C, H, W): the pipeline's tensor comes from an HWC numpy array, so it is channels-last
        # in memory (with a full batch stride), and convolution kernels differ by memory format, so matching
        # that layout is what makes the encoder's output identical.
        if size != OUTPUT_SIZE:
            frames = resize(frames, size)
        pixels = frames.permute(0, 2, 3, 1).contiguous()
        image = self._pixel_values[pixels.long()].permute(0, 3, 1, 2)
        latents = self.pipe._encode_vae_image(image=image, generator=None)
        latents = Flux2KleinPipeline._pack_latents(latents)  # (B, 1024, C) at 512²
        return latents, self._reference_latent_ids(size).expand(frames.shape[0], -1, -1)

    def _encode_style(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        """A style image's uint8 pixels (1, 3, S, S) as reference latent tokens, encoded at size² exactly as
        a frame is (the pipeline encodes every reference image alike)."""
        with torch.no_grad():
            return self._encode_reference(pixels, size)[0]

    def _style_reference_ids(self, reference_size: int, style_size: int) -> torch.Tensor:
        key = (reference_size, style_size)
        if key not in self._style_ids:
            patch = self.pipe.vae_scale_factor * 2  # type: ignore[union-attr]
            self._style_ids[key] = style_reference_ids(
                reference_size // patch, style_size // patch, self._latent_channels, self.device
            )
        return self._style_ids[key]

    def _decode(self, latents: torch.Tensor, latent_ids: torch.Tensor, decoder: str = "full") -> torch.Tensor:
        """Denoised latent tokens as float images in [0, 1], (B, 3, 512, 512), through ``decoder``."""
        assert self.pipe is not None
        latents = Flux2KleinPipeline._unpack_latents_with_ids(
            latents, latent_ids, self._latent_size, self._latent_size
        )
        if decoder != "full":
            # A small or tiny decoder takes the normalised patchified latent (decoders.py).
            image = self.decoders[decoder](latents)
            return self.pipe.image_processor.postprocess(image, output_type="pt")
        latents = latents * self._bn_std + self._bn_mean
        latents = Flux2KleinPipeline._unpatchify_latents(latents)
        image = self.pipe.vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    # ------------------------------------------------------------------ cached per prompt / seed / steps

    def prompt_embeds(self, prompt: str) -> torch.Tensor:
        """(1, 512, joint_attention_dim) embedding of ``prompt``; the text encoder runs once per prompt."""
        embeds = self._prompt_cache.get(prompt)
        if embeds is not None:
            self._prompt_cache.move_to_end(prompt)
            return embeds
        pipe = self._with_text_encoder()
        # Encoded alone, not batched with other new prompts, so a prompt's embedding never depends on
        # which other prompts arrived in the same batch.
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder(
                pipe.text_encoder, pipe.tokenizer, self.device, graph=self.replays_graphs
            )
        embeds = self._prompt_encoder(prompt)
        self._prompt_cache[prompt] = embeds
        while len(self._prompt_cache) > self.config.prompt_cache_size:
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
            while len(self._noise_cache) > 4 * self.config.prompt_cache_size:
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

    def _reference_latent_ids(self, size: int) -> torch.Tensor:
        # One reference image per job, at time coordinate 10 as Flux2KleinPipeline places the first one.
        if size not in self._reference_ids:
            side = size // (self.pipe.vae_scale_factor * 2)  # type: ignore[union-attr]
            shape = (1, self._latent_channels, side, side)
            ids = Flux2KleinPipeline._prepare_image_ids([torch.empty(shape, device="meta")])
            self._reference_ids[size] = ids.to(self.device)
        return self._reference_ids[size]

    def _job_prompt(self, job: FrameJob) -> str:
        """The job's prompt with its adapter's trigger words appended (lora.prompt_with_trigger)."""
        return prompt_with_trigger(job.prompt, self._adapter_trigger(job.adapter))

    def _adapter_trigger(self, adapter: str | None) -> str:
        if adapter is None:
            return ""
        for info in self.adapters:
            if info.name == adapter:
                return info.trigger
        raise ValueError(f"unknown adapter {adapter!r}; this engine has {[a.name for a in self.adapters]}")

    def _select_adapters(
        self,
        batch_size: int,
        adapters: Sequence[str | None],
        scales: Sequence[float | None],
        recipe: ModeRecipe,
    ) -> bool:
        """Each row's LoRA adapter (None: none) and scale (None: its default): one choice for every row is
        fused into the recipe's transformer's weights (in place, only when it changed), different choices
        are written into the buffers the low-rank branches read. Values only either way, so no graph is
        compiled or captured again once both kinds are warm. Returns whether the batch runs the branches."""
        assert self.transformers is not None
        if not (len(adapters) == len(scales) == batch_size):
            raise ValueError(f"{batch_size} frames need as many adapters and scales")
        selection = self.transformers.lora
        if selection is None:
            if any(adapter is not None for adapter in adapters):
                raise ValueError("this engine serves no LoRA adapters")
            return False
        selection.select(adapters, scales)
        self.transformers.prepare_lora(recipe)
        return selection.branches

    def _recipe(self, mode: str) -> ModeRecipe:
        try:
            return self._recipes[mode]
        except KeyError:
            raise ValueError(f"unknown mode {mode!r}; this engine has {', '.join(self._recipes)}") from None

    # ------------------------------------------------------------------ frames in and out

    def decode_frames(self, jpegs: Sequence[bytes]) -> torch.Tensor:
        """uint8 RGB frames (B, 3, 512, 512) on the engine's device."""
        return decode_jpegs(jpegs, self.device)

    def encode_jpegs(self, images: torch.Tensor) -> list[bytes]:
        """JPEG bytes of float images in [0, 1] (B, 3, H, W), rounded to 8 bits as diffusers' PIL output."""
        return encode_jpegs(images, self.config.jpeg_quality)


def _group_jobs(
    jobs: Sequence[FrameJob], default_mode: str, default_steps: int
) -> dict[tuple[str, int, bool], list[int]]:
    """Job indices by (mode, steps, whether a style image comes with it): one transformer batch each, since
    their schedules, token counts and graphs differ."""
    groups: dict[tuple[str, int, bool], list[int]] = {}
    for index, job in enumerate(jobs):
        key = (job.mode or default_mode, job.steps if job.steps > 0 else default_steps, job.style is not None)
        groups.setdefault(key, []).append(index)
    return groups
