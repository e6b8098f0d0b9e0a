"""The small and tiny decoders: loaded from weights written here in each published format (TAEF2's
safetensors in its Hub key layout and in taesd.py's; FLUX.2-small-decoder's diffusers folder; a Hub repo id
resolved from the model cache), decoding the same denoised latents the exact mode decodes, in the form each
was trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from safetensors.torch import save_file
from torch import nn

from inference.engines.flux2 import Flux2Config, Flux2Engine, ModeRecipe
from inference.engines.flux2.decoders import (
    DecoderLoadError,
    SmallDecoder,
    TinyDecoder,
    load_tiny_decoder,
    resolve_weights,
    small_decoder_config,
)
from inference.engines.flux2.klein_config import TINY
from inference.protocol import OUTPUT_SIZE
from tests.inference.helpers import SECRET

LATENT_CHANNELS = TINY.vae["latent_channels"]
CPU = torch.device("cpu")


# taesd.py's TAEF2 (github.com/madebyollin/taesd, ``Decoder``/``Encoder(use_midblock_gn=True)``), restated
# here as the reference the engine's AutoencoderTiny-based decoder must reproduce.
def _conv(n_in: int, n_out: int, **kwargs: object) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)  # type: ignore[arg-type]


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, use_midblock_gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if use_midblock_gn:
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, n_in * 4, 1, bias=False),
                nn.GroupNorm(4, n_in * 4),
                nn.ReLU(),
                nn.Conv2d(n_in * 4, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _reference_decoder(latent_channels: int) -> nn.Sequential:
    gn = {"use_midblock_gn": True}
    return nn.Sequential(
        _Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        _Block(64, 64, **gn), _Block(64, 64, **gn), _Block(64, 64, **gn),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _conv(64, 3),
    )  # fmt: skip


def _reference_encoder(latent_channels: int) -> nn.Sequential:
    gn = {"use_midblock_gn": True}
    return nn.Sequential(
        _conv(3, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64, **gn), _Block(64, 64, **gn), _Block(64, 64, **gn),
        _conv(64, latent_channels),
    )  # fmt: skip


def _published_taef2(latent_channels: int, seed: int = 0) -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """(taesd.py's decoder, taef2.safetensors's state dict): the Hub file is in diffusers' layout, which the
    model card maps to taesd.py's by dropping "layers" and adding one to each decoder index."""
    torch.manual_seed(seed)
    decoder = _reference_decoder(latent_channels).eval()
    encoder = _reference_encoder(latent_channels).eval()
    state: dict[str, torch.Tensor] = {}
    for key, value in encoder.state_dict().items():
        state[f"encoder.layers.{key}"] = value.clone()
    for key, value in decoder.state_dict().items():
        index, suffix = key.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{suffix}"] = value.clone()
    return decoder, state


@pytest.fixture(scope="module")
def taef2_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Sequential, Path]:
    decoder, state = _published_taef2(LATENT_CHANNELS)
    path = tmp_path_factory.mktemp("taef2") / "taef2.safetensors"
    save_file(state, str(path))
    return decoder, path


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[AutoencoderKLFlux2, Path]:
    """FLUX.2-small-decoder's format: a diffusers AutoencoderKLFlux2 folder with narrower decoder widths."""
    torch.manual_seed(5)
    vae = AutoencoderKLFlux2(**small_decoder_config(TINY.vae)).eval()
    path = tmp_path_factory.mktemp("small-decoder")
    vae.save_pretrained(path, safe_serialization=True)
    return vae, path


@pytest.fixture(scope="module")
def engine(
    taef2_file: tuple[nn.Sequential, Path], small_folder: tuple[AutoencoderKLFlux2, Path]
) -> Flux2Engine:
    config = Flux2Config(
        tiny=True,
        device="cpu",
        modes=("exact",),
        custom_modes={
            "tiny-decoder": ModeRecipe(decoder="tiny"),
            "small-decoder": ModeRecipe(decoder="small"),
        },
        tiny_decoder=str(taef2_file[1]),
        small_decoder=str(small_folder[1]),
    )
    engine = Flux2Engine(config)
    engine.load()
    return engine


def _inputs(module: nn.Module) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _module, args, _output: seen.append(args[0].detach().clone()))
    return seen, hook


def _frame() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, 256, (1, 3, 17, 17), generator=generator, dtype=torch.uint8).float()
    size = (OUTPUT_SIZE, OUTPUT_SIZE)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear").round().to(torch.uint8)


def test_the_tiny_decoder_decodes_the_exact_modes_normalised_latent_as_taesd_does(
    engine: Flux2Engine, taef2_file: tuple[nn.Sequential, Path]
) -> None:
    reference, _ = taef2_file
    assert engine.pipe is not None
    frame = _frame()
    vae_inputs, vae_hook = _inputs(engine.pipe.vae.post_quant_conv)
    tiny_inputs, tiny_hook = _inputs(engine.decoders["tiny"])
    try:
        exact = engine.render_frames(frame, ["ink"], steps=2, seeds=[7], mode="exact")
        tiny = engine.render_frames(frame, ["ink"], steps=2, seeds=[7], mode="tiny-decoder")
    finally:
        vae_hook.remove()  # type: ignore[attr-defined]
        tiny_hook.remove()  # type: ignore[attr-defined]
    # The same denoised latent reaches both decoders: the VAE's denormalised, TAEF2's normalised (the form
    # the transformer produces), both unpatchified to (B, C, 64, 64).
    normalised = tiny_inputs[0]
    denormalised = Flux2KleinPipeline._unpatchify_latents(normalised * engine._bn_std + engine._bn_mean)
    assert torch.allclose(denormalised, vae_inputs[-1], atol=1e-6)
    assert not torch.allclose(Flux2KleinPipeline._unpatchify_latents(normalised), vae_inputs[-1], atol=1e-2)
    with torch.no_grad():
        expected = reference(Flux2KleinPipeline._unpatchify_latents(normalised)).clamp(0, 1)
    assert tiny.shape == exact.shape == (1, 3, OUTPUT_SIZE, OUTPUT_SIZE)
    assert torch.allclose(tiny, expected, atol=1e-5)
    assert (tiny - exact).abs().max() > 0.05  # a different decoder: an approximation, labelled as one


def test_the_small_decoder_decodes_the_denormalised_latent_with_its_own_weights(
    engine: Flux2Engine, small_folder: tuple[AutoencoderKLFlux2, Path]
) -> None:
    published, _ = small_folder
    small = engine.decoders["small"]
    assert isinstance(small, SmallDecoder)
    assert small.vae.encoder is None  # the frame is encoded by the model's own encoder
    seen, hook = _inputs(small)
    try:
        image = engine.render_frames(_frame(), ["ink"], steps=2, seeds=[7], mode="small-decoder")
    finally:
        hook.remove()  # type: ignore[attr-defined]
    latents = Flux2KleinPipeline._unpatchify_latents(seen[0] * engine._bn_std + engine._bn_mean)
    with torch.no_grad():
        expected = published.decode(latents, return_dict=False)[0]
    expected = engine.pipe.image_processor.postprocess(expected, output_type="pt")  # type: ignore[union-attr]
    assert torch.allclose(image, expected, atol=1e-5)


def test_decoder_modes_are_labelled_approximate_and_built_only_when_a_mode_uses_them(
    engine: Flux2Engine,
) -> None:
    modes = {mode.id: mode for mode in engine.modes}
    assert not modes["exact"].approximate
    assert modes["tiny-decoder"].approximate
    assert modes["tiny-decoder"].detail == "tiny decoder"
    assert modes["small-decoder"].approximate
    assert modes["small-decoder"].detail == "small decoder"
    exact_only = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact", "turbo")))
    exact_only.load()
    assert exact_only.decoders == {}


def test_flash_is_turbo_with_the_tiny_decoder_built_with_random_weights_for_a_random_model() -> None:
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("flash",)))
    engine.load()
    flash = engine.modes[0]
    assert flash.id == "flash"
    assert flash.approximate
    assert "tiny decoder" in flash.detail
    tiny = engine.decoders["tiny"]
    assert isinstance(tiny, TinyDecoder)
    assert set(engine.decoders) == {"tiny"}
    # TAEF2's GroupNorm branches are part of the random build, so its timings are the published model's.
    assert sum(1 for module in tiny.modules() if isinstance(module, nn.GroupNorm)) == 6


def test_taesd_py_layout_loads_to_the_same_decoder_as_the_hub_layout(tmp_path: Path) -> None:
    reference, hub_state = _published_taef2(LATENT_CHANNELS, seed=11)
    upstream = {key: value for key, value in reference.state_dict().items()}  # decoder-only, bare indices
    save_file(hub_state, str(tmp_path / "taef2.safetensors"))
    (tmp_path / "upstream").mkdir()
    save_file(upstream, str(tmp_path / "upstream" / "taef2_decoder.safetensors"))
    latents = torch.randn(1, LATENT_CHANNELS * 4, 4, 4, generator=torch.Generator().manual_seed(2))
    outputs = []
    for path in (tmp_path / "taef2.safetensors", tmp_path / "upstream"):
        decoder = load_tiny_decoder(path, latent_channels=LATENT_CHANNELS, device=CPU, dtype=torch.float32)
        with torch.no_grad():
            outputs.append(decoder(latents))
    with torch.no_grad():
        expected = reference(Flux2KleinPipeline._unpatchify_latents(latents)) * 2 - 1
    assert outputs[0].shape == (1, 3, 64, 64)
    assert torch.allclose(outputs[0], expected, atol=1e-5)
    assert torch.equal(outputs[0], outputs[1])


def test_weights_that_do_not_fit_are_refused_with_the_reason(tmp_path: Path) -> None:
    _, state = _published_taef2(8)
    save_file(state, str(tmp_path / "taef2.safetensors"))
    with pytest.raises(DecoderLoadError, match="not a TAEF2 checkpoint for 32 channels"):
        load_tiny_decoder(tmp_path, latent_channels=32, device=CPU, dtype=torch.float32)
    save_file({"model.diffusion_model.weight": torch.zeros(1)}, str(tmp_path / "taef2.safetensors"))
    with pytest.raises(DecoderLoadError, match="not a TAESD/TAEF2 weight name"):
        load_tiny_decoder(tmp_path, latent_channels=32, device=CPU, dtype=torch.float32)
    with pytest.raises(DecoderLoadError, match=r"no \.safetensors"):
        load_tiny_decoder(tmp_path / "upstream-missing", latent_channels=32, device=CPU, dtype=torch.float32)


def _small_decoder_engine(folder: Path) -> Flux2Engine:
    modes = {"small-decoder": ModeRecipe(decoder="small")}
    return Flux2Engine(
        Flux2Config(tiny=True, device="cpu", modes=("exact",), custom_modes=modes, small_decoder=str(folder))
    )


def test_a_small_decoder_folder_for_another_latent_space_or_without_decoder_weights_is_refused(
    tmp_path: Path, small_folder: tuple[AutoencoderKLFlux2, Path]
) -> None:
    other = dict(small_decoder_config(TINY.vae), latent_channels=8, norm_num_groups=4)
    AutoencoderKLFlux2(**other).save_pretrained(tmp_path / "other")
    with pytest.raises(DecoderLoadError, match="decodes 8 latent channels, the model has 4"):
        _small_decoder_engine(tmp_path / "other").load()
    _, folder = small_folder
    encoder_only = tmp_path / "encoder-only"
    encoder_only.mkdir()
    (encoder_only / "config.json").write_text((folder / "config.json").read_text())
    vae = AutoencoderKLFlux2(**small_decoder_config(TINY.vae))
    save_file(
        {k: v for k, v in vae.state_dict().items() if k.startswith("encoder.")},
        str(encoder_only / "diffusion_pytorch_model.safetensors"),
    )
    with pytest.raises(DecoderLoadError, match=r"lacks \d+ decoder weights"):
        _small_decoder_engine(encoder_only).load()


def test_a_repo_id_resolves_to_its_snapshot_in_the_model_cache(tmp_path: Path) -> None:
    """The loader goes through huggingface_hub: a repo already in the cache (the layout snapshot_download
    writes) is found offline; one that is not is an error, not a silent random decoder."""
    _, state = _published_taef2(LATENT_CHANNELS, seed=4)
    repo = tmp_path / "models--madebyollin--taef2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "taef2.safetensors"))
    path = resolve_weights("madebyollin/taef2", cache_dir=tmp_path, local_files_only=True)
    assert path == snapshot
    decoder = load_tiny_decoder(path, latent_channels=LATENT_CHANNELS, device=CPU, dtype=torch.float32)
    assert isinstance(decoder, TinyDecoder)
    with pytest.raises(Exception, match=r"(?i)cache|offline|local"):
        resolve_weights("black-forest-labs/FLUX.2-small-decoder", cache_dir=tmp_path, local_files_only=True)


def test_a_recipe_names_a_known_decoder() -> None:
    with pytest.raises(ValueError, match="decoder must be one of full, small, tiny"):
        ModeRecipe(decoder="taesd")
    assert ModeRecipe(decoder="full") == ModeRecipe()
    assert not ModeRecipe(decoder="full").approximate
    assert ModeRecipe(fp8=True, decoder="tiny").describe() == "fp8, tiny decoder"


def test_the_workers_settings_name_the_decoders_weights(
    taef2_file: tuple[nn.Sequential, Path], small_folder: tuple[AutoencoderKLFlux2, Path]
) -> None:
    from inference.config import load_worker_config
    from inference.engines import create_engine

    reference, path = taef2_file
    environ = {
        "STREAM_SECRET": SECRET,
        "INFERENCE_ENGINE": "flux2",
        "FLUX2_WEIGHTS": "tiny",
        "FLUX2_DEVICE": "cpu",
        "FLUX2_MODES": "exact,flash",
        "FLUX2_TINY_DECODER": str(path),
        "FLUX2_SMALL_DECODER": str(small_folder[1]),
    }
    engine = create_engine(load_worker_config(environ))
    assert isinstance(engine, Flux2Engine)
    assert engine.config.small_decoder == str(small_folder[1])
    engine.load()
    tiny = engine.decoders["tiny"]
    assert isinstance(tiny, TinyDecoder)
    # The file's weights, not a random build: the first convolution after the clamp is taesd.py's index 1.
    assert torch.equal(tiny.autoencoder.decoder.layers[0].weight, reference[1].weight)
    unset = {key: value for key, value in environ.items() if not key.endswith("_DECODER")}
    assert create_engine(load_worker_config(unset)).config.tiny_decoder is None  # the published repo


def test_a_random_decoder_saved_in_its_published_format_loads_back_the_same(
    engine: Flux2Engine, tmp_path: Path
) -> None:
    """What the bench's cold start hands its child process, which loads from disk, not random weights."""
    from inference.engines.flux2.decoders import build_decoders, random_decoder, save_decoder

    assert engine.pipe is not None
    vae, mean, std = engine.pipe.vae, engine._bn_mean, engine._bn_std
    latents = torch.randn(1, 4 * LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(9))
    for name in ("tiny", "small"):
        built = random_decoder(name, vae, mean, std, seed=3)
        path = save_decoder(built, tmp_path / name)
        (loaded,) = build_decoders(
            [name], model_vae=vae, bn_mean=mean, bn_std=std, sources={name: str(path)}, random_weights=True
        ).values()
        with torch.no_grad():
            assert torch.equal(loaded(latents), built(latents)), name
