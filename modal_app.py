"""The GPU worker on Modal: serverless H100s that scale to zero.

    modal secret create stylecast-worker HF_TOKEN=hf_... STREAM_SECRET=... USAGE_REPORT_URL=https://.../api/usage/report
    modal deploy modal_app.py

then set the web app's INFERENCE_URL to the printed URL with `wss://` and `/ws` (docs/deployment.md).
The same `inference` package serves `python -m inference` on any CUDA box and the app's in-process worker.

Two classes, one web endpoint each: `Inference` on one H100, and `InferencePremium` on two in one
container (`gpu="H100:2"`) for a premium plan: one engine replica per GPU (FLUX2_DEVICES, unset: every GPU
the container sees), one viewer's consecutive frames rendered on both at once (inference/scheduler.py), so
exact mode runs at about twice one GPU's frame rate at one render's latency. Its admission floor is
PREMIUM_MIN_SESSION_FPS, so a second viewer, who would halve the first one's rate, is refused (4503) and
Modal starts another container instead. Each class has its own endpoint; the web app has one
INFERENCE_URL, so routing only a premium plan's viewers to the premium one is still to be built in the app
(docs/deployment.md, "A premium plan on two GPUs").
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import modal

APP_NAME = "stylecast-inference"
# How many viewers one GPU carries, from the admission arithmetic (inference/admission.py): sessions take
# turns, so n sessions each get engine_fps / n, and the worker refuses one that would put everyone below
# MIN_SESSION_FPS. The engine's rates come from docs/performance.md (random klein-4B weights, 512x512,
# 2 steps, an H200; an H100 is a little slower, so its containers fill one session sooner, never later).
MIN_SESSION_FPS = 12
ENGINE_FPS = {"exact": 13.8, "turbo": 30.5}
SESSIONS_PER_GPU = {mode: max(1, int(fps // MIN_SESSION_FPS)) for mode, fps in ENGINE_FPS.items()}  # 1, 2
# Modal scales out when containers average `target_inputs` inputs; a WebSocket is one input for its whole
# life. Aim at what the default mode (exact) carries, so a new container starts while the first viewer is
# still alone; allow as many as the fastest mode carries, plus room for /health, /metrics and a refused
# socket's short life, so those never take a viewer's place (the worker itself refuses the extra viewer
# with 4503, and the studio retries on another container).
TARGET_INPUTS = SESSIONS_PER_GPU["exact"]
MAX_INPUTS = max(SESSIONS_PER_GPU.values()) + 2
# The premium class: two GPUs, one engine replica each; a viewer alone gets both GPUs' frames (admission
# counts the replicas together: inference/admission.py), and the floor keeps each container to the viewers
# that rate allows: one in exact (27.6 FPS alone, 13.8 with a second), two in turbo.
PREMIUM_GPUS = 2
PREMIUM_MIN_SESSION_FPS = 24


def sessions_per_container(gpus: int, min_session_fps: float) -> dict[str, int]:
    """Viewers one container carries per mode: every GPU's frames shared by its sessions, at the floor."""
    return {mode: max(1, int(gpus * fps // min_session_fps)) for mode, fps in ENGINE_FPS.items()}


PREMIUM_SESSIONS = sessions_per_container(PREMIUM_GPUS, PREMIUM_MIN_SESSION_FPS)  # 1, 2
PREMIUM_TARGET_INPUTS = PREMIUM_SESSIONS["exact"]
PREMIUM_MAX_INPUTS = max(PREMIUM_SESSIONS.values()) + 2
CACHE_DIR = "/cache"  # Hugging Face downloads land on the Volume, so only the first cold start downloads
# MODAL_SNAPSHOT=1 (read at deploy time, and baked into the image so the container defines the same class):
# a CPU memory snapshot of each container after the imports and the weights read into host memory, restored
# by later cold starts instead of redoing both; the move to the GPU and the warm-up run after the restore
# (no GPU is attached while a CPU snapshot is taken). MODAL_SNAPSHOT=gpu: Modal's GPU memory snapshot
# (alpha), which also captures the weights on the GPU and the warmed, compiled engine. docs/deployment.md.
SNAPSHOT = os.environ.get("MODAL_SNAPSHOT", "").strip().lower()
if SNAPSHOT not in ("", "0", "1", "gpu"):
    raise ValueError(f"MODAL_SNAPSHOT must be 0, 1 or gpu, got {SNAPSHOT!r}")
MEMORY_SNAPSHOT = SNAPSHOT in ("1", "gpu")
GPU_SNAPSHOT = SNAPSHOT == "gpu"
SECRET_NAME = "stylecast-worker"  # noqa: S105 (the name of a Modal Secret, not a secret)


def inference_requirements() -> list[str]:
    """The worker's pip requirements, read from pyproject.toml so there is one list to maintain: the
    project's dependencies plus the `inference` extra. Only read where the image is defined (locally);
    inside the container the image already exists and the file is not there."""
    if not modal.is_local():
        return []
    project = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["inference"]]


image = (
    modal.Image.debian_slim(python_version="3.11")
    # torchvision gives the engine nvJPEG decoding on the GPU; without it frames are decoded with Pillow.
    .uv_pip_install(*inference_requirements(), "torchvision")
    .env(
        {
            "HF_HOME": f"{CACHE_DIR}/huggingface",
            "INFERENCE_ENGINE": "flux2",
            "MIN_SESSION_FPS": str(MIN_SESSION_FPS),
            "MODEL_CACHE_DIR": CACHE_DIR,
            "MODAL_SNAPSHOT": SNAPSHOT,
            # torch.compile's caches on the Volume too: only the first container ever compiles from
            # scratch; later cold starts load the compiled kernels (docs/performance.md, cold start).
            "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/torch-compile/inductor",
            "TRITON_CACHE_DIR": f"{CACHE_DIR}/torch-compile/triton",
        }
    )
    .add_local_python_source("inference")
)
model_cache = modal.Volume.from_name("stylecast-model-cache", create_if_missing=True)
worker_secret = modal.Secret.from_name(SECRET_NAME, required_keys=["STREAM_SECRET"])

app = modal.App(APP_NAME, image=image)


def _plain_method(method: Any) -> Any:
    return method


class _WorkerContainer:
    """What both classes do in a container; the subclasses say how many GPUs it has and the floor."""

    GPUS = 1
    MIN_SESSION_FPS: float | None = None  # None: the image's MIN_SESSION_FPS

    # snap=True is refused on a class without memory snapshots: without them `load` calls this itself.
    @(modal.enter(snap=True) if MEMORY_SNAPSHOT else _plain_method)
    def prepare(self) -> None:
        """With a memory snapshot, what it captures: the imports, the engines built (one per GPU) and (CPU
        snapshot) their weights read into host memory, or (GPU snapshot) everything ``load`` does. Without
        one, the first half of the container's start."""
        from inference.start_up_collection import collection_paused

        with collection_paused():
            import msgspec

            from inference.config import load_worker_config
            from inference.engines import create_engine, replica_devices

            self.config = load_worker_config(
                worker_id=os.environ.get("MODAL_TASK_ID", "modal"), min_session_fps=self.MIN_SESSION_FPS
            )
            if not self.config.device_list and self.config.device is None:
                # Chosen now, not found: no GPU is attached while a CPU snapshot is taken, and the engine's
                # dtype follows its device (bfloat16 on CUDA).
                if self.GPUS > 1:
                    devices = ",".join(f"cuda:{index}" for index in range(self.GPUS))
                    self.config = msgspec.structs.replace(self.config, devices=devices)
                elif MEMORY_SNAPSHOT:
                    self.config = msgspec.structs.replace(self.config, device="cuda")
            self.devices = replica_devices(self.config)
            self.engines = [create_engine(self.config, device) for device in self.devices]
            self.loaded_on_cpu = False
            if MEMORY_SNAPSHOT and not GPU_SNAPSHOT and all(hasattr(e, "load_on_cpu") for e in self.engines):
                for engine in self.engines:
                    engine.load_on_cpu()
                self.loaded_on_cpu = True
            elif GPU_SNAPSHOT:
                self._warm()
            if MEMORY_SNAPSHOT:
                from inference.readahead import settle

                settle()  # the snapshot is taken when this returns: no reader caught mid-read

    @modal.enter(snap=False)
    def load(self) -> None:
        """Load the engines and warm their default mode once per container, before it takes any
        connection; the render loops warm the other modes while they are idle. Modal hands a socket to the
        app only after this returns: the studio fetches its ticket once the worker has admitted it, so
        however long this takes, no ticket expires while the socket waits."""
        from inference.start_up_collection import collection_paused

        with collection_paused():
            if not MEMORY_SNAPSHOT:
                self.prepare()
            task_id = os.environ.get("MODAL_TASK_ID")
            if task_id and task_id != self.config.worker_id:  # restored from a snapshot another task took
                import msgspec

                self.config = msgspec.structs.replace(self.config, worker_id=task_id)
            if not GPU_SNAPSHOT:
                self._warm()

    def _warm(self) -> None:
        from inference.engines import use_device

        # One engine at a time: torch.compile is not thread-safe (the render loops warm one at a time too).
        for device, engine in zip(self.devices, self.engines, strict=True):
            use_device(device)
            engine.warm_up()  # with load_on_cpu() done: the weights moved to the GPU, then the warm-up
        if modal.is_local():
            return
        model_cache.commit()  # keep the download and the compiled kernels for the next cold start

    @modal.asgi_app()
    def web(self) -> Any:
        from inference.server import create_inference_app

        replicas = [
            (device or f"replica {index}", _built(device, engine))
            for index, (device, engine) in enumerate(zip(self.devices, self.engines, strict=True))
        ]
        return create_inference_app(self.config, replicas=replicas)


def _built(device: str | None, engine: Any) -> Any:
    """The factory of a replica whose engine the enter hooks built: called in its render thread, which it
    binds to the engine's device first."""

    def factory() -> Any:
        from inference.engines import use_device

        use_device(device)
        return engine

    return factory


_CLASS_OPTIONS: dict[str, Any] = {
    "scaledown_window": 120,  # two idle minutes before scaling to zero: short gaps between streams stay warm
    "timeout": 60 * 60,  # a stream is one long WebSocket request; an Ultra period is 60 minutes
    "volumes": {CACHE_DIR: model_cache},
    "secrets": [worker_secret],
    "enable_memory_snapshot": MEMORY_SNAPSHOT,
    "experimental_options": {"enable_gpu_snapshot": True} if GPU_SNAPSHOT else None,
}


@app.cls(gpu="H100", **_CLASS_OPTIONS)
@modal.concurrent(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
class Inference(_WorkerContainer):
    """One H100, one engine: the standard plans."""


@app.cls(gpu=f"H100:{PREMIUM_GPUS}", **_CLASS_OPTIONS)
@modal.concurrent(max_inputs=PREMIUM_MAX_INPUTS, target_inputs=PREMIUM_TARGET_INPUTS)
class InferencePremium(_WorkerContainer):
    """Two H100s in one container, one engine replica each (FLUX2_DEVICES unset: both), for a premium
    plan: a viewer's frames alternate between them, about twice one GPU's frame rate."""

    GPUS = PREMIUM_GPUS
    MIN_SESSION_FPS = PREMIUM_MIN_SESSION_FPS
