"""Engines by name. Each is imported only when chosen, so the preview worker (and the web app that mounts
it) never imports torch or diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from inference.engines.base import Engine
from inference.preload import preload_on_gpu
from inference.readahead import checkpoint_readahead

if TYPE_CHECKING:
    from inference.config import WorkerConfig


def _preview(config: WorkerConfig, device: str | None = None) -> Engine:
    module = importlib.import_module("inference.engines.preview")
    return module.create_preview_engine(config)


def flux2_options(config: WorkerConfig, device: str | None = None) -> dict[str, Any]:
    """The worker's settings as `create_flux2_engine` keyword options (`Flux2Config` fields); unset ones
    keep the engine's defaults. `device`: the replica's device, instead of FLUX2_DEVICE."""
    options: dict[str, Any] = {
        "model": config.model_path or config.model_id,
        "steps": config.default_steps,
        "max_batch": config.max_batch,
        "compile": config.compile,
        "modes": config.mode_ids,
        "random_weights": config.weights == "random",
        "tiny": config.weights == "tiny",
    }
    optional = {
        "cache_dir": config.cache_dir,
        "device": device or config.device,
        "dtype": config.dtype,
        "small_decoder": config.small_decoder,
        "tiny_decoder": config.tiny_decoder,
    }
    options.update({name: value for name, value in optional.items() if value is not None})
    if config.loras:
        options["loras"] = config.adapter_specs
    return options


def _flux2(config: WorkerConfig, device: str | None = None) -> Engine:
    model = config.model_path or config.model_id
    loads = config.weights not in ("random", "tiny")
    if loads:
        # The checkpoint is read into the page cache while torch and diffusers are imported (seconds each),
        # and once torch is, onto the GPU while diffusers is imported (inference/preload.py).
        checkpoint_readahead(model, config.cache_dir)
        preload_on_gpu(model, device or config.device, config.cache_dir)
    use_device(device)
    module = importlib.import_module("inference.engines.flux2")  # imports torch and diffusers
    return module.create_flux2_engine(**flux2_options(config, device))


def use_device(device: str | None) -> None:
    """Make `device` ("cuda:1") the calling thread's current CUDA device, so that whatever the engine does
    without naming a device (streams, graph pools, library handles) happens on its own GPU. A replica's
    render thread calls it before its engine's first call; a no-op for None, "cuda" and CPUs."""
    if device is None or not device.startswith("cuda:"):
        return
    importlib.import_module("torch").cuda.set_device(device)  # per thread, as the CUDA runtime's is


# name -> factory taking the WorkerConfig and a replica's device (None: the config's) and returning an
# Engine that is not yet warmed up.
ENGINES: Final[dict[str, Callable[[WorkerConfig, str | None], Engine]]] = {
    "preview": _preview,
    "flux2": _flux2,
}


def replica_devices(config: WorkerConfig) -> tuple[str | None, ...]:
    """The device of each engine replica the worker runs (None: the engine's own choice, FLUX2_DEVICE or
    CUDA when available). The flux2 engine: FLUX2_DEVICES, else FLUX2_DEVICE's one device, else one
    replica per visible CUDA device (which imports torch: blocking, call it off the event loop); the
    preview engine: PREVIEW_REPLICAS replicas on the CPU."""
    if config.engine != "flux2":
        return (None,) * config.preview_replicas
    if config.device_list:
        return config.device_list
    if config.device is not None:
        return (config.device,)
    torch = importlib.import_module("torch")
    count = int(torch.cuda.device_count())  # counts without creating a CUDA context
    return tuple(f"cuda:{index}" for index in range(count)) if count > 1 else (None,)


def create_engine(config: WorkerConfig, device: str | None = None) -> Engine:
    """Build the engine named by config.engine, on `device` (a replica's; None: the config's). Importing
    an engine's stack can take seconds, so the worker calls this from a render thread, never from the
    event loop."""
    try:
        factory = ENGINES[config.engine]
    except KeyError:
        raise ValueError(f"unknown engine {config.engine!r}; choose one of {', '.join(ENGINES)}") from None
    engine = factory(config, device)
    if not isinstance(engine, Engine):
        raise TypeError(
            f"engine {config.engine!r} is a {type(engine).__name__}, which does not implement Engine"
        )
    return engine


def is_preview(engine: Engine) -> bool:
    """Whether the engine's pixels are a stand-in for the model (shown as such to the user). An engine may
    say so with a `preview` attribute; the classical-filter engine is always one."""
    return bool(getattr(engine, "preview", engine.name == "preview"))
