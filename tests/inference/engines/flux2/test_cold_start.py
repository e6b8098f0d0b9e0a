"""What a worker's first frame waits for: the default mode at batch size 1 only (the larger batches, and the
other modes, are warmed while idle); weights read into host memory first (a memory snapshot's half of
the load) end up on the engine's device; a checkpoint's text encoder loads beside the warm-up, and the
frames are those of the pipeline loaded whole."""

from __future__ import annotations

import importlib
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors import SafetensorError

from inference.engines.flux2 import Flux2Config, Flux2Engine
from inference.engines.flux2.klein_config import TINY, build_random_components
from inference.preload import preload_checkpoint


def _batch_sizes(engine: Flux2Engine) -> tuple[list[int], object]:
    assert engine.transformers is not None
    seen: list[int] = []
    hook = engine.transformers.exact.register_forward_hook(
        lambda _module, _args, kwargs, _output: seen.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    return seen, hook


def _warm_up_recording(engine: Flux2Engine, release: threading.Event) -> list[tuple[bool, float]]:
    """Warm ``engine`` up; per transformer call, whether its text encoder had arrived and the largest
    |embedding| the call got. The first call sets ``release``, letting a held text encoder go on."""
    assert engine.transformers is not None
    seen: list[tuple[bool, float]] = []

    def record(_module: object, _args: object, kwargs: dict[str, Any], _output: object) -> None:
        load = engine.text_encoder_load
        seen.append((load is None or load.done(), kwargs["encoder_hidden_states"].abs().max().item()))
        release.set()  # the warm-up got this far without the text encoder: let it finish arriving

    hook = engine.transformers.exact.register_forward_hook(record, with_kwargs=True)
    try:
        engine.warm_up()
    finally:
        hook.remove()
    return seen


def test_the_first_frame_waits_for_batch_size_one_of_the_default_mode_only() -> None:
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",), max_batch=2, compile=False))
    engine.load()
    # The warm-up schedule a compiled engine follows (one graph per batch shape), here without compiling:
    # compiling the tiny model on a CPU would take minutes.
    engine.compile = True
    seen, hook = _batch_sizes(engine)
    try:
        engine.warm_up()
        assert set(seen) == {1}
        seen.clear()
        for task in engine.deferred_warm_ups():  # what the scheduler runs while idle
            task()
        assert 2 in seen  # the default mode's larger batch, warmed after the first frame could go
    finally:
        hook.remove()  # type: ignore[attr-defined]


def test_weights_read_on_the_cpu_first_are_moved_to_the_device_by_load() -> None:
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",)))
    engine.load_on_cpu()
    assert engine.pipe is None  # nothing attached yet: the device is untouched until load()
    pipe = engine.load()
    assert pipe.transformer.device == engine.device
    frame = torch.full((1, 3, 512, 512), 128, dtype=torch.uint8)
    assert engine.render_frames(frame, ["ink"], steps=2, seeds=[1]).shape == (1, 3, 512, 512)
    engine.load_on_cpu()  # after load(): nothing more to read
    assert engine.load() is pipe


@contextmanager
def _move_held(
    engine: Flux2Engine, release: threading.Event, error: Exception | None = None
) -> Iterator[list[str]]:
    """Hold the staged text encoder's move to the device (torch's ``Module.to`` on that one model) until
    ``release`` is set, then move it, or raise ``error`` as a failed copy would; yields the names of the
    threads that moved it."""
    assert engine._staged is not None
    model = engine._staged.text_encoder
    movers: list[str] = []

    def held(*args: Any, **kwargs: Any) -> Any:
        movers.append(threading.current_thread().name)
        assert release.wait(60), "the text encoder was never released"
        if error is not None:
            raise error
        return type(model).to(model, *args, **kwargs)

    model.to = held
    try:
        yield movers
    finally:
        del model.to


def test_a_staged_text_encoder_moves_beside_the_warm_up_and_renders_as_one_loaded_directly() -> None:
    config = Flux2Config(tiny=True, device="cpu", modes=("exact",))
    engine = Flux2Engine(config)
    engine.load_on_cpu()
    release = threading.Event()
    with _move_held(engine, release) as movers:
        pipe = engine.load()
        assert pipe.text_encoder is None  # still on its way, on its own thread
        assert engine.transformers is not None

        seen = _warm_up_recording(engine, release)
    assert movers == ["text-encoder-move"]
    assert seen[0] == (False, 0.0)  # the first transformer call ran on the stand-in embedding
    assert engine.text_encoder_load is None
    assert pipe.text_encoder is not None
    direct = Flux2Engine(config)
    frame = torch.full((1, 3, 512, 512), 70, dtype=torch.uint8)
    frame[:, 2, 200:] = 180
    for prompt in ("ink", "warm-up"):  # the warm-up's prompt is a real one afterwards
        ours = engine.render_frames(frame, [prompt], steps=2, seeds=[3])
        assert torch.equal(ours, direct.render_frames(frame, [prompt], steps=2, seeds=[3])), prompt


def test_a_staged_text_encoder_starts_moving_only_once_the_other_weights_are_on_the_device() -> None:
    """Copies from pageable host memory share one link: a text encoder crossing beside the transformer would
    make the warm-up, which starts with the transformer, wait for both."""
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",)))
    engine.load_on_cpu()
    assert engine._staged is not None
    text_encoder_moving = threading.Event()
    during: dict[str, bool] = {}
    moved: list[str] = []
    components = {"transformer": engine._staged.transformer, "vae": engine._staged.vae}

    def slow_copy(name: str, module: torch.nn.Module) -> Any:
        def to(*args: Any, **kwargs: Any) -> Any:
            # As long as a real copy takes: time enough for a text encoder moving beside it to start.
            during[name] = text_encoder_moving.wait(0.5)
            moved.append(name)
            return type(module).to(module, *args, **kwargs)

        return to

    for name, module in components.items():
        module.to = slow_copy(name, module)
    release = threading.Event()
    try:
        with _move_held(engine, release) as movers:
            text_encoder = engine._staged.text_encoder
            held = text_encoder.to

            def text_encoder_to(*args: Any, **kwargs: Any) -> Any:
                moved.append("text_encoder")
                text_encoder_moving.set()
                return held(*args, **kwargs)

            text_encoder.to = text_encoder_to
            engine.load()
            release.set()
            engine._with_text_encoder()
    finally:
        for module in components.values():
            del module.to
    assert movers == ["text-encoder-move"]
    assert during == {"transformer": False, "vae": False}
    assert moved[-1] == "text_encoder"
    assert set(moved) == {"transformer", "vae", "text_encoder"}


def test_a_staged_text_encoder_that_cannot_move_fails_the_warm_up_and_each_prompt_with_its_error() -> None:
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",)))
    engine.load_on_cpu()
    release = threading.Event()
    release.set()
    with _move_held(engine, release, RuntimeError("CUDA error: out of memory")):
        engine.load()
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.warm_up()
    # Not a None encoder later on: the next prompt gets the same error.
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.prompt_embeds("ink")


# ------------------------------------------------------------------ a checkpoint loaded in two halves


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture saved as a diffusers checkpoint, as a worker reads one."""
    path = tmp_path_factory.mktemp("checkpoint")
    components = build_random_components(TINY, seed=3)
    Flux2KleinPipeline(**components, is_distilled=True).save_pretrained(path)
    return path


def _checkpoint_engine(path: Path) -> Flux2Engine:
    return Flux2Engine(
        Flux2Config(model=str(path), local_files_only=True, device="cpu", modes=("exact",), compile=False)
    )


def _loaded_whole(path: Path) -> tuple[Flux2KleinPipeline, Flux2Engine]:
    """The checkpoint loaded as one diffusers pipeline, and an engine rendering with it: the reference."""
    whole = Flux2KleinPipeline.from_pretrained(path, dtype=torch.float32, is_distilled=True)
    return whole, Flux2Engine(Flux2Config(device="cpu", modes=("exact",), compile=False), pipeline=whole)


def _with_a_cut_file(checkpoint: Path, copy: Path, component: str) -> Path:
    """A copy of ``checkpoint`` whose ``component`` weights are cut short, as an interrupted download
    leaves them."""
    shutil.copytree(checkpoint, copy)
    (weights,) = (copy / component).glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    return copy


@contextmanager
def _text_encoder_held(checkpoint: Path, release: threading.Event) -> Iterator[list[str]]:
    """Hold the text encoder's half of the load (its tokenizer's loader, transformers', called on the load's
    own thread) until ``release`` is set; yields the names of the threads that loaded a tokenizer."""
    library, name = json.loads((checkpoint / "model_index.json").read_text())["tokenizer"]
    tokenizer_class = getattr(importlib.import_module(library), name)
    original = tokenizer_class.from_pretrained
    own = tokenizer_class.__dict__.get("from_pretrained")
    loaders: list[str] = []

    def held(_cls: type, *args: Any, **kwargs: Any) -> Any:
        loaders.append(threading.current_thread().name)
        assert release.wait(60), "the text encoder was never released"
        return original(*args, **kwargs)

    tokenizer_class.from_pretrained = classmethod(held)
    try:
        yield loaders
    finally:
        if own is None:
            del tokenizer_class.from_pretrained  # the inherited classmethod again
        else:
            tokenizer_class.from_pretrained = own


def test_a_checkpoint_renders_the_same_frames_as_the_pipeline_loaded_whole(checkpoint: Path) -> None:
    engine = _checkpoint_engine(checkpoint)
    engine.warm_up()
    assert engine.text_encoder_load is None  # joined by the warm-up
    assert engine.pipe is not None
    assert engine.pipe.text_encoder is not None
    _, reference = _loaded_whole(checkpoint)
    frame = torch.full((1, 3, 512, 512), 90, dtype=torch.uint8)
    frame[:, 1, :256] = 200
    for prompt in ("ink", "warm-up"):  # the warm-up's prompt too: its embedding is the real one now
        ours = engine.render_frames(frame, [prompt], steps=2, seeds=[5])
        assert torch.equal(ours, reference.render_frames(frame, [prompt], steps=2, seeds=[5])), prompt


def test_the_warm_up_compiles_while_the_text_encoder_is_still_loading(checkpoint: Path) -> None:
    engine = _checkpoint_engine(checkpoint)
    release = threading.Event()
    with _text_encoder_held(checkpoint, release) as loaders:
        engine.load()
        assert engine.transformers is not None
        assert engine.pipe is not None
        assert engine.pipe.text_encoder is None  # still loading, on its own thread

        seen = _warm_up_recording(engine, release)
    assert loaders == ["text-encoder-load"]
    # The first transformer call ran before the text encoder had loaded, on a stand-in embedding.
    assert seen[0] == (False, 0.0)
    # warm_up() returned with the text encoder loaded, and the stand-in is gone: "warm-up" as a user's prompt
    # is encoded like any other.
    assert engine.text_encoder_load is None
    assert engine.pipe.text_encoder is not None
    assert engine.prompt_embeds("warm-up").abs().max().item() > 0


def test_a_text_encoder_that_cannot_load_fails_the_warm_up_with_its_error(
    checkpoint: Path, tmp_path: Path
) -> None:
    engine = _checkpoint_engine(_with_a_cut_file(checkpoint, tmp_path / "checkpoint", "text_encoder"))
    engine.load()  # the transformer and the VAE are fine
    # The loader's own error, not a missing attribute later on; and a frame gets it too, not a None encoder.
    with pytest.raises(SafetensorError, match="header"):
        engine.warm_up()
    with pytest.raises(SafetensorError, match="header"):
        engine.prompt_embeds("ink")


def test_weights_preloaded_before_diffusers_was_imported_render_what_the_loader_renders(
    checkpoint: Path, tmp_path: Path
) -> None:
    own = tmp_path / "checkpoint"  # a preload is once per process and checkpoint
    shutil.copytree(checkpoint, own)
    preload = preload_checkpoint(str(own), "cpu")
    assert preload is not None
    engine = _checkpoint_engine(own)
    engine.warm_up()
    # The engine took every component's weights from the preload (each is handed over once) ...
    components = ("text_encoder", "transformer", "vae")
    assert sorted(Path(folder).name for folder in preload.seconds) == list(components)
    assert all(preload.take(own / name) is None for name in components)
    # ... and its models are the loader's, weight for weight, and render the same frames.
    whole, reference = _loaded_whole(own)
    assert engine.pipe is not None
    for name in components:
        ours, theirs = getattr(engine.pipe, name).state_dict(), getattr(whole, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name
        assert not getattr(engine.pipe, name).training
    frame = torch.full((1, 3, 512, 512), 60, dtype=torch.uint8)
    assert torch.equal(
        engine.render_frames(frame, ["ink"], steps=2, seeds=[2]),
        reference.render_frames(frame, ["ink"], steps=2, seeds=[2]),
    )


def test_a_transformer_the_preload_could_not_read_fails_the_load_with_the_loaders_error(
    checkpoint: Path, tmp_path: Path
) -> None:
    broken = _with_a_cut_file(checkpoint, tmp_path / "checkpoint", "transformer")
    preload_checkpoint(str(broken), "cpu")
    # diffusers' loader reads it again and names the file that is broken.
    with pytest.raises(OSError, match=r"transformer/diffusion_pytorch_model\.safetensors"):
        _checkpoint_engine(broken).load()


# ------------------------------------------------------------------ inductor's cache keys before the warm-up


def _compile_keys() -> list[Any]:
    from inference.engines.flux2.compiled import compile_keys

    keys = compile_keys()
    assert len(keys) == 2  # Triton is installed here: its key and torch's
    return keys


def _forget(key: Any) -> None:
    (key.clear if hasattr(key, "clear") else key.cache_clear)()


def _is_cached(key: Any) -> bool:
    """Whether torch's cache of this key holds its value (an lru_cache, or a cache that can prefetch)."""
    if hasattr(key, "cache_info"):
        return bool(key.cache_info().currsize)
    cells = dict(zip(key.__code__.co_freevars, key.__closure__ or (), strict=True))
    return cells["_cache"].cell_contents is not key.__globals__["_cache_sentinel"]


def test_a_compiled_engine_read_into_host_memory_holds_inductors_cache_keys() -> None:
    # What a memory snapshot captures then includes the keys: a restored worker does not hash again.
    for key in _compile_keys():
        _forget(key)
    Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",), compile=True)).load_on_cpu()
    assert all(_is_cached(key) for key in _compile_keys())
    for key in _compile_keys():
        _forget(key)
    Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",), compile=False)).load_on_cpu()
    assert not any(_is_cached(key) for key in _compile_keys())  # an engine that never compiles: no keys


def test_keys_computed_ahead_are_those_a_compilation_computes() -> None:
    from inference.engines.flux2.compiled import prefetch_compile_keys

    fresh = []
    for key in _compile_keys():
        _forget(key)
        fresh.append(key())
        _forget(key)
    thread = prefetch_compile_keys()
    if thread is not None:
        thread.join(60)
    assert [key() for key in _compile_keys()] == fresh
    assert fresh[1]  # torch's source hash: never empty
