"""Every setting of the GPU worker, read from the environment in one place.

The web app builds a `WorkerConfig` from its own settings when it serves the worker in-process (sandbox);
the standalone worker (`python -m inference`) reads it with `load_worker_config()`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from collections.abc import Mapping
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec

from inference.adapters import AdapterSpec, AdapterSpecError, parse_adapters
from inference.protocol import DEFAULT_STEPS, MAX_STEPS, MIN_STEPS, MODE_ID_PATTERN

ENGINE_NAMES: Final = ("preview", "flux2")
# HS256 keys shorter than the hash output weaken the signature; PyJWT warns below 32 bytes too.
MIN_SECRET_BYTES: Final = 32
DEFAULT_MODEL_ID: Final = "black-forest-labs/FLUX.2-klein-4B"
# The flux2 engine's model stack is the `inference` extra; the web app and the preview engine need none of
# it, so a plain `uv run python -m app` does not install it.
MODEL_STACK_MODULES: Final = ("torch", "diffusers", "transformers", "accelerate", "safetensors")
MODEL_STACK_INSTALL: Final = "uv sync --extra inference"
# Where the web app takes stream claims (app/routes/stream.py serves it).
STREAM_CLAIM_PATH: Final = "/api/stream/claim"

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
_MODE_ID: Final = re.compile(MODE_ID_PATTERN)
_DEVICE: Final = re.compile(r"^(cpu|cuda(:\d+)?)$")


class WorkerConfigError(Exception):
    """The environment does not describe a worker that can start."""


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    stream_secret: str  # shared with the app: verifies tickets, signs usage reports
    engine: str = "preview"  # a name in inference.engines.ENGINES
    worker_id: str = msgspec.field(default_factory=socket.gethostname)
    # The app's `POST /api/usage/report`; None turns usage reporting off.
    usage_report_url: str | None = None
    usage_report_interval_seconds: PositiveFloat = 5.0
    # First retry delay of a failed usage report; doubles per attempt up to usage_retry_max_seconds.
    usage_retry_base_seconds: PositiveFloat = 0.5
    usage_retry_max_seconds: PositiveFloat = 8.0
    # How many times the end-of-stream (final) report is attempted before it is given up and logged.
    usage_final_attempts: int = 8
    # How long a client may take to send `hello` after connecting.
    hello_timeout_seconds: PositiveFloat = 5.0
    # An authenticated session that sends no frame for this long is closed (4410) and its reservation
    # released: a forgotten tab must not hold a GPU slot and the user's minutes.
    idle_timeout_seconds: PositiveFloat = 60.0
    # Admission: a new session is refused (4503, "try another worker") when it would drop the sessions
    # already here below this frame rate at the engine's measured render times.
    min_session_fps: PositiveFloat = 12.0
    # The app's `POST /api/stream/claim`, asked before `ready` so a ticket streams once across every worker.
    # Unset: derived from usage_report_url's origin; with neither, claims are remembered by this worker
    # alone (one worker, development only).
    stream_claim_url: str | None = None

    # Steps of a session that has not chosen any.
    default_steps: int = DEFAULT_STEPS

    # FLUX.2 engine: a Hugging Face repo id, or a local directory that wins over it when set.
    model_id: str = DEFAULT_MODEL_ID
    model_path: str | None = None
    cache_dir: str | None = None  # where weights are downloaded; a persistent volume in production
    # Frames of different sessions rendered in one transformer call. 1: sessions take turns. The klein
    # transformer is compute-bound at batch 1, so batching adds no throughput while every session waits
    # for the whole batch (docs/performance.md, "Sessions through the scheduler"). Larger batches pay on
    # smaller models.
    max_batch: int = 1
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: CUDA when available
    # One engine replica per device, comma-separated ("cuda:0,cuda:1"), each with its own render thread;
    # the scheduler spreads frames over them (one session's consecutive frames render on several at once).
    # None: FLUX2_DEVICE's one device when set, else every visible CUDA device (one replica when there are
    # fewer than two). A CPU may be listed more than once (tests); a CUDA device only once.
    devices: str | None = None
    dtype: str | None = None  # "bfloat16", "float16", "float32"; None: the engine's default for the device
    # torch.compile the transformer and VAE: a longer warm-up, faster frames. None: on CUDA, not on a CPU.
    compile: bool | None = None
    # The render modes sessions may choose, comma-separated, the default first: "exact" reproduces the
    # reference pipeline; "fast" and "turbo" are approximate (inference/engines/flux2/recipes.py). Each
    # one adds its compilation to the warm-up.
    modes: str = "exact,fast,turbo"
    # "pretrained": the checkpoint; "random": klein-4B's architecture with random weights (benchmarks
    # without the download); "tiny": a tiny random model that runs on a CPU (tests).
    weights: Literal["pretrained", "random", "tiny"] = "pretrained"
    # LoRA style adapters loaded at start, which each session may choose (inference/adapters.py has the
    # format): "clay=owner/repo:clay.safetensors;scale=0.8;trigger=claymation,ink=/models/ink.safetensors".
    # Hub files are downloaded into cache_dir; one that fails to load stops the worker from starting.
    loras: str = ""
    # Repo id or local path of the smaller decoders a mode may use ("flash" uses the tiny one), fetched into
    # cache_dir once such a mode is offered; None: the published repos (FLUX.2-small-decoder, taef2).
    small_decoder: str | None = None
    tiny_decoder: str | None = None

    # Preview engine: sleep this long per render call and during warm-up, so browser tests can simulate a
    # slow engine and a slow model load.
    preview_delay_seconds: float = 0.0
    preview_warmup_seconds: float = 0.0
    # Preview engine replicas, each with its own render thread, as FLUX2_DEVICES gives the flux2 engine:
    # for tests and the replicas bench on a CPU.
    preview_replicas: int = 1

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_NAMES:
            raise WorkerConfigError(f"INFERENCE_ENGINE must be one of {', '.join(ENGINE_NAMES)}")
        if self.engine == "flux2" and (missing := missing_model_stack()):
            raise WorkerConfigError(
                f"the flux2 engine needs the GPU model stack, and {', '.join(missing)} is not installed: "
                f"run `{MODEL_STACK_INSTALL}` (or start with `uv run --extra inference ...`)"
            )
        if not MIN_STEPS <= self.default_steps <= MAX_STEPS:
            raise WorkerConfigError(f"DEFAULT_STEPS must be between {MIN_STEPS} and {MAX_STEPS}")
        if self.max_batch < 1:
            raise WorkerConfigError("MAX_BATCH must be at least 1")
        if self.preview_delay_seconds < 0 or self.preview_warmup_seconds < 0:
            raise WorkerConfigError("PREVIEW_DELAY_MS and PREVIEW_WARMUP_MS must be >= 0")
        if self.preview_replicas < 1:
            raise WorkerConfigError("PREVIEW_REPLICAS must be at least 1")
        if self.devices is not None:
            _check_devices(self.devices, self.device)
        if self.usage_final_attempts < 1:
            raise WorkerConfigError("usage_final_attempts must be at least 1")
        try:
            parse_adapters(self.loras)
        except AdapterSpecError as exc:
            raise WorkerConfigError(f"FLUX2_LORAS: {exc}") from None
        if not self.mode_ids or any(not _MODE_ID.match(mode) for mode in self.mode_ids):
            raise WorkerConfigError("FLUX2_MODES must be a comma-separated list of mode ids, e.g. exact,fast")

    @property
    def claim_url(self) -> str | None:
        if self.stream_claim_url:
            return self.stream_claim_url
        if not self.usage_report_url:
            return None
        origin = urlsplit(self.usage_report_url)
        return urlunsplit((origin.scheme, origin.netloc, STREAM_CLAIM_PATH, "", ""))

    @property
    def adapter_specs(self) -> tuple[AdapterSpec, ...]:
        return parse_adapters(self.loras)

    @property
    def mode_ids(self) -> tuple[str, ...]:
        return tuple(mode.strip() for mode in self.modes.split(",") if mode.strip())

    @property
    def device_list(self) -> tuple[str, ...]:
        """FLUX2_DEVICES as a tuple; empty when it is not set."""
        return _split_devices(self.devices) if self.devices is not None else ()


def _split_devices(devices: str) -> tuple[str, ...]:
    return tuple(device.strip() for device in devices.split(","))


def _check_devices(devices: str, device: str | None) -> None:
    listed = _split_devices(devices)
    bad = [name for name in listed if not _DEVICE.match(name)]
    if bad or not listed:
        raise WorkerConfigError(
            f"FLUX2_DEVICES must be a comma-separated list of devices such as cuda:0,cuda:1 or cpu; "
            f"{', '.join(repr(name) for name in bad) or 'it is empty'} is not one"
        )
    cuda = [name for name in listed if name.startswith("cuda")]
    if len(set(cuda)) != len(cuda) or ("cuda" in cuda and len(cuda) > 1):
        raise WorkerConfigError("FLUX2_DEVICES lists a CUDA device twice: one replica per GPU")
    if device is not None:
        raise WorkerConfigError("set FLUX2_DEVICES or FLUX2_DEVICE, not both")


# Environment variable -> field, for everything optional.
_OPTIONAL_ENV: Final = {
    "INFERENCE_ENGINE": "engine",
    "WORKER_ID": "worker_id",
    "USAGE_REPORT_URL": "usage_report_url",
    "USAGE_REPORT_INTERVAL_SECONDS": "usage_report_interval_seconds",
    "STREAM_CLAIM_URL": "stream_claim_url",
    "IDLE_TIMEOUT_SECONDS": "idle_timeout_seconds",
    "MIN_SESSION_FPS": "min_session_fps",
    "FLUX2_MODEL_ID": "model_id",
    "FLUX2_MODEL_PATH": "model_path",
    "MODEL_CACHE_DIR": "cache_dir",
    "DEFAULT_STEPS": "default_steps",
    "MAX_BATCH": "max_batch",
    "FLUX2_DEVICE": "device",
    "FLUX2_DEVICES": "devices",
    "FLUX2_DTYPE": "dtype",
    "FLUX2_COMPILE": "compile",
    "FLUX2_MODES": "modes",
    "FLUX2_WEIGHTS": "weights",
    "FLUX2_LORAS": "loras",
    "FLUX2_SMALL_DECODER": "small_decoder",
    "FLUX2_TINY_DECODER": "tiny_decoder",
    "PREVIEW_REPLICAS": "preview_replicas",
}


def load_worker_config(environ: Mapping[str, str] | None = None, **overrides: object) -> WorkerConfig:
    """Read the worker's settings; keyword overrides (the CLI's options) win over the environment."""
    env = os.environ if environ is None else environ

    def get(name: str) -> str:
        return env.get(name, "").strip()

    missing = [name for name in ("STREAM_SECRET",) if not get(name)]
    if missing:
        raise WorkerConfigError(
            f"Missing required environment variables: {', '.join(missing)}. STREAM_SECRET must be the same "
            "value the web app uses to issue stream tickets."
        )
    secret = get("STREAM_SECRET")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise WorkerConfigError(f"STREAM_SECRET must be at least {MIN_SECRET_BYTES} bytes long")

    values: dict[str, object] = {"stream_secret": secret}
    for variable, field in _OPTIONAL_ENV.items():
        if get(variable):
            values[field] = get(variable)
    for variable, field in (
        ("PREVIEW_DELAY_MS", "preview_delay_seconds"),
        ("PREVIEW_WARMUP_MS", "preview_warmup_seconds"),
    ):
        if get(variable):
            values[field] = _number(variable, get(variable)) / 1000
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        # strict=False converts the environment's strings to the fields' numbers.
        return msgspec.convert(values, WorkerConfig, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        for variable, field in _OPTIONAL_ENV.items():  # name the variable the operator set, not the field
            message = message.replace(f"`$.{field}`", variable)
        raise WorkerConfigError(f"Invalid worker setting: {message}") from exc


def missing_model_stack() -> list[str]:
    """The model stack's packages that cannot be imported here (none where the extra is installed)."""
    return [name for name in MODEL_STACK_MODULES if importlib.util.find_spec(name) is None]


def _number(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise WorkerConfigError(f"{name} must be a number") from exc
