"""Where the engine's pipeline comes from: a diffusers-format checkpoint (a local folder, or downloaded
from the Hugging Face Hub), or the klein architecture built with random weights.

A checkpoint is loaded in two halves. The transformer, the VAE and the scheduler come first: they are all
that compiling and warming the engine needs. The text encoder (about half of the bytes, Qwen3-4B) and its
tokenizer are read on a thread of their own meanwhile (``TextEncoderLoad``), so reading and moving them
overlaps the warm-up instead of coming before it. The readahead reads the files in the same order
(``inference.readahead.LOAD_ORDER``), and a preload started before diffusers was imported
(``inference.preload``) may already hold the weights on the device: the models are then built around its
tensors rather than read again."""

from __future__ import annotations

import abc
import importlib
import json
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final

import diffusers
import torch
from diffusers import Flux2KleinPipeline

from inference.engines.flux2.config import Flux2Config
from inference.engines.flux2.klein_config import KLEIN_4B, TINY, build_random_components
from inference.preload import DeviceReader, device_name, take_preloaded

logger = logging.getLogger(__name__)

# Only the diffusers-format folders: the repo also carries single-file checkpoints we never read.
CHECKPOINT_PATTERNS: Final = (
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "tokenizer/*",
    "transformer/*",
    "vae/*",
)


# The components the second half of a checkpoint's load reads (``TextEncoderLoad``), and the others.
TEXT_COMPONENTS: Final = ("text_encoder", "tokenizer")
_FIRST_COMPONENTS: Final = ("transformer", "vae", "scheduler")


def build_pipeline(
    config: Flux2Config, device: torch.device, dtype: torch.dtype
) -> tuple[Flux2KleinPipeline, TextEncoderLoad | None]:
    """The pipeline ``config`` names, on ``device`` in ``dtype``. Built with random weights it is complete
    (and the second item None); loaded from a checkpoint its text encoder and tokenizer are None until the
    returned ``TextEncoderLoad`` has them."""
    if config.tiny or config.random_weights:
        architecture = TINY if config.tiny else KLEIN_4B
        logger.info("building %s with random weights on %s (%s)", architecture.name, device, dtype)
        components = build_random_components(
            architecture, device=device, dtype=dtype, seed=config.weights_seed
        )
        return Flux2KleinPipeline(**components, is_distilled=True), None
    path = download_checkpoint(
        config.model,
        cache_dir=config.cache_dir,
        revision=config.revision,
        local_files_only=config.local_files_only,
    )
    index = json.loads((path / "model_index.json").read_text())
    text = TextEncoderLoad(path, index, device, dtype)
    preloaded = _preloaded_models(path, index, device, dtype)
    pipe = _load_components(path, device, dtype, skip=TEXT_COMPONENTS, given=preloaded)
    return pipe, text


def _preloaded_models(
    path: Path, index: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """The first half's models whose weights a preload already put on ``device``, built around them."""
    models: dict[str, torch.nn.Module] = {}
    for name in _FIRST_COMPONENTS:
        library, class_name = index.get(name, (None, None))
        if library != "diffusers" or not hasattr(diffusers, class_name):
            continue
        state = take_preloaded(path / name, device)
        if state is not None:
            models[name] = model_from_state(getattr(diffusers, class_name), path / name, state, dtype)
    return models


def model_from_state(
    cls: Any, folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.nn.Module:
    """The diffusers model of ``folder``'s config with ``state``'s tensors as its weights (taken, not
    copied), cast to ``dtype`` as ``from_pretrained(dtype=...)`` casts them; strict: a missing or unexpected
    weight raises."""
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            wanted = torch.float32 if any(part in keep for part in name.split(".")) else dtype
            state[name] = tensor.to(wanted)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_components(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    skip: tuple[str, ...],
    given: dict[str, torch.nn.Module] | None = None,
) -> Flux2KleinPipeline:
    """The checkpoint's pipeline without the components in ``skip`` (None there) and with those ``given``:
    every other component is loaded by ``Flux2KleinPipeline.from_pretrained`` as a whole pipeline's would be,
    whichever half it is in."""
    without: dict[str, Any] = {**dict.fromkeys(skip), **(given or {})}
    if device.type == "cuda":
        # Read straight into device memory: loaded plainly, every weight is first materialised in host memory
        # and then copied again by .to(), and how long that takes varies with the host's free memory.
        with torch.cuda.device(device):
            return Flux2KleinPipeline.from_pretrained(
                path, dtype=dtype, is_distilled=True, device_map="cuda", **without
            )
    pipe = Flux2KleinPipeline.from_pretrained(path, dtype=dtype, is_distilled=True, **without)
    return pipe.to(device)


class PendingTextEncoder(abc.ABC):
    """A text encoder on its way to the device beside the warm-up, its slow part on a thread of its own that
    starts when this is made: ``TextEncoderLoad`` from a checkpoint, ``TextEncoderMove`` from host memory.
    What the thread returns, or raises, is handed to whoever waits (``_result()``), on their thread."""

    def __init__(self, device: torch.device, thread_name: str) -> None:
        self.started = time.perf_counter()
        self.finished: float | None = None  # perf_counter() when the thread's part ended, either way
        # "cuda" means the calling thread's current device; the new thread's would be device 0.
        self.device = torch.device(device_name(device))
        self._outcome: Future[Any] = Future()
        threading.Thread(target=self._run, name=thread_name, daemon=True).start()

    @abc.abstractmethod
    def _work(self) -> Any:
        """The thread's part."""

    def _run(self) -> None:
        try:
            outcome = self._work()
        except BaseException as error:
            self.finished = time.perf_counter()
            self._outcome.set_exception(error)
        else:
            self.finished = time.perf_counter()
            self._outcome.set_result(outcome)

    def _result(self) -> Any:
        return self._outcome.result()

    def done(self) -> bool:
        return self._outcome.done()

    @abc.abstractmethod
    def attach_to(self, pipe: Flux2KleinPipeline) -> None:
        """Give ``pipe`` the text encoder (waiting for it)."""


class TextEncoderLoad(PendingTextEncoder):
    """A checkpoint's text encoder and tokenizer. The thread reads the text encoder's weights into device
    memory (or takes them from a preload) and loads the tokenizer; ``result()`` then builds the model around
    those tensors on the calling thread.

    Only tensors (and the tokenizer, which builds no model) are read off the calling thread: diffusers' and
    transformers' loaders change process-wide state while they build a model (the default dtype, patched
    constructors), so a model built on another thread could corrupt whatever the engine is building or
    compiling meanwhile."""

    def __init__(self, path: Path, index: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        """``index``: the checkpoint's model_index.json."""
        self.path = path
        self.dtype = dtype
        self._index = index
        self._built: tuple[Any, Any] | None = None
        super().__init__(device, "text-encoder-load")

    def _work(self) -> tuple[dict[str, torch.Tensor] | None, Any]:
        folder = self.path / "text_encoder"
        state = take_preloaded(folder, self.device) or DeviceReader(self.device).read_component(folder)
        tokenizer = _component_class(self._index, "tokenizer").from_pretrained(self.path / "tokenizer")
        return state, tokenizer

    def result(self) -> tuple[Any, Any]:
        """(text encoder, tokenizer): waits for the thread, then builds the model (once)."""
        if self._built is None:
            state, tokenizer = self._result()
            cls = _component_class(self._index, "text_encoder")
            folder = self.path / "text_encoder"
            device_map = str(self.device) if self.device.type == "cuda" else None
            if state is None:  # not plain safetensors: the loader reads it (and reports what is wrong)
                model = cls.from_pretrained(folder, dtype=self.dtype, device_map=device_map)
            else:
                config = cls.config_class.from_pretrained(folder)
                model = cls.from_pretrained(
                    None, config=config, state_dict=state, dtype=self.dtype, device_map=device_map
                )
            self._built = (model.eval(), tokenizer)
        return self._built

    def attach_to(self, pipe: Flux2KleinPipeline) -> None:
        """Give ``pipe`` the text encoder and tokenizer (``result()``)."""
        text_encoder, tokenizer = self.result()
        pipe.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)


def _component_class(index: dict[str, Any], name: str) -> Any:
    """The class model_index.json names for component ``name`` (its library's attribute)."""
    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name)


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
        allow_patterns=list(CHECKPOINT_PATTERNS),
        local_files_only=local_files_only,
    )
    logger.info("%s is at %s", model, path)
    return Path(path)


class TextEncoderMove(PendingTextEncoder):
    """A text encoder in host memory (``Flux2Engine.load_on_cpu``, what a memory snapshot holds), moved to the
    device on the thread and on a CUDA stream of its own, so that its half of the bytes crosses while the
    warm-up runs instead of before it. Moving parameters changes no process-wide state, and the warm-up
    captures its graphs in thread-local mode, so this thread's copies do not disturb a capture."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self._model = model
        super().__init__(device, "text-encoder-move")

    def _work(self) -> torch.nn.Module:
        # Module.to moves the parameters in place: the host copies are freed as they cross.
        if self.device.type != "cuda":
            return self._model.to(self.device)
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            self._model.to(self.device)
        stream.synchronize()
        return self._model

    def attach_to(self, pipe: Flux2KleinPipeline) -> None:
        pipe.register_modules(text_encoder=self._result())
