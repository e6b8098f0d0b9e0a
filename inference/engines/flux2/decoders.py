"""Decoders a mode can turn its denoised latents into pixels with, besides the model's own VAE decoder.

* ``full``: the checkpoint's ``AutoencoderKLFlux2`` decoder (exact).
* ``small``: Black Forest Labs' FLUX.2-small-decoder, an ``AutoencoderKLFlux2`` whose decoder is narrower
  (``decoder_block_out_channels`` 96/192/384/384 instead of 128/256/512/512) and was trained on the same
  latent space; it decodes what the full decoder decodes: the latent denormalised with the model's
  batch-norm statistics and unpatchified to (B, 32, H/8, W/8).
* ``tiny``: madebyollin's TAEF2, the TAESD architecture for FLUX.2's 32 latent channels. It was trained on
  the latent "API" of FLUX.2's autoencoder, i.e. the batch-norm *normalised* latent (what the transformer
  produces), only unpatchified to (B, 32, H/8, W/8); it skips the denormalisation. Its decoder is diffusers'
  ``AutoencoderTiny(latent_channels=32)`` plus one addition diffusers cannot express: the first three
  blocks after the latent (and the last three of the encoder) carry a "mid-block GroupNorm" branch,
  ``x + pool(x)`` with ``pool = 1x1 conv (64 -> 256), GroupNorm(4), ReLU, 1x1 conv (256 -> 64)``.

Only the decoders are swapped: every mode encodes the webcam frame with the model's own encoder, so the
conditioning the transformer sees is the checkpoint's.

Weights come from a Hub repo id (downloaded into the model cache) or a local path; with random weights
(``Flux2Config.random_weights``/``tiny``) each architecture is built with random weights instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import torch
from diffusers import AutoencoderKLFlux2, AutoencoderTiny, Flux2KleinPipeline
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from inference.engines.flux2.group_norm import use_split_group_norm

logger = logging.getLogger(__name__)

DECODERS: Final = ("full", "small", "tiny")
SMALL_DECODER_REPO: Final = "black-forest-labs/FLUX.2-small-decoder"
TINY_DECODER_REPO: Final = "madebyollin/taef2"
# FLUX.2-small-decoder's decoder widths (its config.json), for the random-weight build of klein-4B.
SMALL_DECODER_CHANNELS: Final = (96, 192, 384, 384)
# The blocks of AutoencoderTiny's Sequential (diffusers layout) that carry TAEF2's GroupNorm branch: the three
# at latent resolution on each side.
TINY_MIDBLOCK_GN_DECODER: Final = (2, 3, 4)
TINY_MIDBLOCK_GN_ENCODER: Final = (11, 12, 13)
_WEIGHT_PATTERNS: Final = ("config.json", "*.safetensors")


class DecoderLoadError(RuntimeError):
    """The decoder's weights could not be found or do not fit its architecture."""


class MidBlockGNTinyBlock(AutoencoderTinyBlock):
    """AutoencoderTinyBlock with TAEF2's GroupNorm branch (taesd.py's ``Block(use_midblock_gn=True)``); its
    parameters are named ``pool.0`` (1x1 conv), ``pool.1`` (GroupNorm) and ``pool.3`` (1x1 conv), as in the
    published weights."""

    def __init__(self, channels: int, act_fn: str) -> None:
        super().__init__(channels, channels, act_fn)
        hidden = 4 * channels
        self.pool = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.GroupNorm(4, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def build_tiny_autoencoder(latent_channels: int = 32) -> AutoencoderTiny:
    """TAEF2's architecture (random weights): AutoencoderTiny with the GroupNorm branches in place."""
    vae = AutoencoderTiny(latent_channels=latent_channels, act_fn="relu", upsample_fn="nearest")
    for layers, indices in (
        (vae.decoder.layers, TINY_MIDBLOCK_GN_DECODER),
        (vae.encoder.layers, TINY_MIDBLOCK_GN_ENCODER),
    ):
        for index in indices:
            block = layers[index]
            assert isinstance(block, AutoencoderTinyBlock)
            layers[index] = MidBlockGNTinyBlock(block.conv[0].in_channels, "relu")
    return vae


def tiny_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TAEF2 state dict in AutoencoderTiny's key layout.

    ``taef2.safetensors`` (the Hub repo) is already in that layout: ``encoder.layers.<i>.*`` and
    ``decoder.layers.<i>.*``; its model card maps it to taesd.py's layout by dropping ``layers`` and adding
    one to each decoder index (taesd.py's decoder starts with its Clamp module, which diffusers applies in
    ``forward`` instead). Weights in taesd.py's layout (``encoder.<i>.*``/``decoder.<i>.*``, or a
    decoder-only file with bare ``<i>.*`` keys) are mapped back here, the inverse of the card's mapping."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(?:(encoder|decoder)\.)?(layers\.)?(\d+)\.(.+)", key)
        if match is None:
            raise DecoderLoadError(f"not a TAESD/TAEF2 weight name: {key!r}")
        part, diffusers_layout, index, suffix = match.groups()
        part = part or "decoder"
        position = int(index)
        if not diffusers_layout and part == "decoder":
            position -= 1
        converted[f"{part}.layers.{position}.{suffix}"] = value
    return converted


class TinyDecoder(nn.Module):
    """TAEF2's decoder on the engine's latents: normalised, patchified (B, 4C, h, w) in; images in [-1, 1]
    (diffusers' convention, as the VAE's decode returns them) out."""

    def __init__(self, autoencoder: AutoencoderTiny) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = Flux2KleinPipeline._unpatchify_latents(latents)
        return self.autoencoder.decoder(latents.to(self.autoencoder.dtype))


class SmallDecoder(nn.Module):
    """A narrower AutoencoderKLFlux2 decoder on the engine's latents: denormalised with the model's own
    batch-norm statistics (the latent space is the model's), unpatchified, post-quant conv, decoder."""

    def __init__(self, vae: AutoencoderKLFlux2, bn_mean: torch.Tensor, bn_std: torch.Tensor) -> None:
        super().__init__()
        # The encoder side is never used: every mode encodes with the model's own encoder.
        vae.encoder = None
        vae.quant_conv = None
        self.vae = vae
        self.register_buffer("bn_mean", bn_mean.clone(), persistent=False)
        self.register_buffer("bn_std", bn_std.clone(), persistent=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents * self.bn_std + self.bn_mean
        latents = Flux2KleinPipeline._unpatchify_latents(latents)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]


def small_decoder_config(vae_config: Mapping[str, object]) -> dict[str, object]:
    """The model VAE's config with FLUX.2-small-decoder's decoder widths (scaled by 3/4 for other widths,
    rounded up to the GroupNorm group count, for the tiny test configuration)."""
    config = {key: value for key, value in vae_config.items() if not key.startswith("_")}
    channels = tuple(int(c) for c in config["block_out_channels"])  # type: ignore[union-attr]
    if channels == (128, 256, 512, 512):
        config["decoder_block_out_channels"] = SMALL_DECODER_CHANNELS
    else:
        groups = int(config["norm_num_groups"])  # type: ignore[call-overload]
        config["decoder_block_out_channels"] = tuple(-(-(3 * c // 4) // groups) * groups for c in channels)
    return config


def resolve_weights(
    source: str,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local file or directory holding ``source``'s weights: itself if it exists locally, else a snapshot
    of the Hub repo (only its config and safetensors) in the model cache."""
    path = Path(source)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    logger.info("fetching decoder %s into %s", source, cache_dir or "the HF cache")
    return Path(
        snapshot_download(
            source,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=list(_WEIGHT_PATTERNS),
            local_files_only=local_files_only,
        )
    )


def _safetensors_files(path: Path, preferred: Iterable[str]) -> list[Path]:
    if path.is_file():
        return [path]
    for name in preferred:
        if (path / name).is_file():
            return [path / name]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*/*.safetensors"))
    if not files:
        raise DecoderLoadError(f"no .safetensors weights in {path}")
    return files


def _read(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_tiny_decoder(
    path: Path, *, latent_channels: int, device: torch.device, dtype: torch.dtype
) -> TinyDecoder:
    """TAEF2 from a safetensors file, or a folder holding one, in either published key layout."""
    files = _safetensors_files(path, ("taef2.safetensors", "diffusion_pytorch_model.safetensors"))
    state = tiny_state_dict(_read(files))
    with torch.device("meta"):
        autoencoder = build_tiny_autoencoder(latent_channels)
    if not any(key.startswith("encoder.") for key in state):
        autoencoder.encoder = None  # a decoder-only file: the engine never uses this encoder
    try:
        autoencoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise DecoderLoadError(
            f"{path} is not a TAEF2 checkpoint for {latent_channels} channels: {error}"
        ) from None
    return TinyDecoder(autoencoder.to(device=device, dtype=dtype).eval().requires_grad_(False))


def load_small_decoder(
    path: Path, *, model_vae: AutoencoderKLFlux2, bn_mean: torch.Tensor, bn_std: torch.Tensor
) -> SmallDecoder:
    """FLUX.2-small-decoder from a diffusers-format folder (config.json and safetensors): its decoder and
    post-quant conv; whatever else the file holds is not read."""
    if not (path / "config.json").is_file():
        raise DecoderLoadError(f"{path} has no config.json (a diffusers AutoencoderKLFlux2 folder is needed)")
    config = json.loads((path / "config.json").read_text())
    if config.get("latent_channels") != model_vae.config.latent_channels:
        raise DecoderLoadError(
            f"{path} decodes {config.get('latent_channels')} latent channels, the model has "
            f"{model_vae.config.latent_channels}"
        )
    with torch.device("meta"):
        vae = AutoencoderKLFlux2.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    needed = [key for key in vae.state_dict() if key.startswith(("decoder.", "post_quant_conv."))]
    state = _read(_safetensors_files(path, ("diffusion_pytorch_model.safetensors",)))
    missing = [key for key in needed if key not in state]
    if missing:
        raise DecoderLoadError(f"{path} lacks {len(missing)} decoder weights, e.g. {missing[:3]}")
    vae.decoder.load_state_dict(_strip(state, "decoder."), strict=True, assign=True)
    vae.post_quant_conv.load_state_dict(_strip(state, "post_quant_conv."), strict=True, assign=True)
    # Only the decoder side was read: the rest is never used (SmallDecoder says why).
    vae.encoder = vae.quant_conv = vae.bn = None
    vae.to(device=model_vae.device, dtype=model_vae.dtype).eval().requires_grad_(False)
    return SmallDecoder(vae, bn_mean, bn_std)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def random_decoder(
    name: str, model_vae: AutoencoderKLFlux2, bn_mean: torch.Tensor, bn_std: torch.Tensor, *, seed: int
) -> nn.Module:
    """The ``small`` or ``tiny`` architecture for the model's VAE with random weights drawn from ``seed``."""
    device, dtype = model_vae.device, model_vae.dtype
    torch.manual_seed(seed)
    with torch.device(device):
        if name == "tiny":
            module: nn.Module = TinyDecoder(build_tiny_autoencoder(model_vae.config.latent_channels))
        elif name == "small":
            module = SmallDecoder(
                AutoencoderKLFlux2(**small_decoder_config(model_vae.config)), bn_mean, bn_std
            )
        else:
            raise ValueError(f"no random build of decoder {name!r}")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_decoders(
    names: Iterable[str],
    *,
    model_vae: AutoencoderKLFlux2,
    bn_mean: torch.Tensor,
    bn_std: torch.Tensor,
    sources: Mapping[str, str | None],
    random_weights: bool,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> dict[str, nn.Module]:
    """The decoders ``names`` asks for besides ``full`` (one each), by name. ``sources`` maps ``small`` and
    ``tiny`` to a repo id or local path; one that is None is the published repo, or with ``random_weights``
    (a model built with random weights) the architecture with random weights."""
    decoders: dict[str, nn.Module] = {}
    for name in dict.fromkeys(names):
        if name == "full":
            continue
        if name not in DECODERS:
            raise ValueError(f"unknown decoder {name!r}; decoders are {', '.join(DECODERS)}")
        source = sources.get(name)
        if source is None and random_weights:
            logger.info("building the %s decoder with random weights", name)
            decoders[name] = random_decoder(name, model_vae, bn_mean, bn_std, seed=seed)
            continue
        source = source or (TINY_DECODER_REPO if name == "tiny" else SMALL_DECODER_REPO)
        path = resolve_weights(source, cache_dir=cache_dir, local_files_only=local_files_only)
        if name == "tiny":
            decoders[name] = load_tiny_decoder(
                path,
                latent_channels=model_vae.config.latent_channels,
                device=model_vae.device,
                dtype=model_vae.dtype,
            )
        else:
            decoders[name] = load_small_decoder(path, model_vae=model_vae, bn_mean=bn_mean, bn_std=bn_std)
    return decoders


def compile_decoder(module: nn.Module) -> None:
    """Compile a small or tiny decoder in place, static shapes, channels-last and two-stage GroupNorm, as
    compile_vae does for the model's own (compiled.py says why)."""
    module.to(memory_format=torch.channels_last)
    use_split_group_norm(module)
    if isinstance(module, SmallDecoder):
        from diffusers.models.attention_processor import AttnProcessor

        module.vae.set_attn_processor(AttnProcessor())
        module.vae.decoder.compile(fullgraph=True, dynamic=False)
    elif isinstance(module, TinyDecoder):
        module.autoencoder.decoder.compile(fullgraph=True, dynamic=False)


def save_decoder(module: nn.Module, folder: str | Path) -> Path:
    """Write a small or tiny decoder in its published format (a diffusers folder; ``taef2.safetensors``),
    so that a process loading a saved checkpoint can load it too; returns the path to name it by."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(module, TinyDecoder):
        path = folder / "taef2.safetensors"
        state = {key: value.contiguous() for key, value in module.autoencoder.state_dict().items()}
        save_file(state, str(path))
        return path
    if isinstance(module, SmallDecoder):
        (folder / "config.json").write_text(json.dumps(dict(module.vae.config)))
        state = {key: value.contiguous() for key, value in module.vae.state_dict().items()}
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    raise TypeError(f"not a small or tiny decoder: {type(module).__name__}")
