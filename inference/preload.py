"""Read a checkpoint's weights (the VAE, the transformer, then the text encoder) into device memory while
the worker is still importing diffusers.

A starting worker imports torch in ~1.5 s and then diffusers in ~5 s (torch._dynamo, sympy), one thread
bound by the CPU. Loading the weights needs only torch, so a thread started between the two reads each
safetensors file through a pinned host buffer straight into tensors on the device, while the imports run;
the engine then builds the modules around those tensors (``inference/engines/flux2/checkpoint.py``) instead
of reading the files again. The reads follow the readahead (``inference/readahead.py``), so they come from
the page cache where it got there first.

The preload is only a head start: a component whose files are not plain safetensors, or whose read fails,
is loaded by diffusers' ``from_pretrained`` as it would be without it, which reports what is wrong with a
file. Nothing here imports torch until a preload is started, so the preview worker never does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from inference.readahead import LOAD_ORDER, cached_checkpoint

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_CHUNK: Final = 64 << 20  # bytes per read and per host-to-device copy; two such buffers alternate
# A model folder's weights as diffusers and as transformers name them: one file, or an index of shards.
_WEIGHT_NAMES: Final = ("diffusion_pytorch_model", "model")
# safetensors' dtype names, as torch attribute names.
_DTYPES: Final = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def component_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a model folder of a diffusers checkpoint (its index's shards, or its one
    file, as diffusers or transformers names them); None when it has neither (another format, a variant
    only), which leaves the component to ``from_pretrained``."""
    for name in _WEIGHT_NAMES:
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return [single]
    return None


class Preload:
    """A thread reading each component's files into tensors on ``device``, one component after another;
    ``start()`` returns at once and ``take()`` waits for a component."""

    def __init__(self, folders: Sequence[Path], device: str) -> None:
        self.folders = list(folders)
        self.device = device
        self.seconds: dict[str, float] = {}  # per folder: from start() until its tensors were on the device
        self._states: dict[str, dict[str, torch.Tensor] | None] = {}
        self._ready = {str(folder): threading.Event() for folder in self.folders}
        self._lock = threading.Lock()

    def start(self) -> Preload:
        threading.Thread(target=self._run, name="weights-preload", daemon=True).start()
        return self

    def take(self, folder: Path) -> dict[str, torch.Tensor] | None:
        """The state dict of ``folder`` on this preload's device, waiting for it, handed over once (its
        tensors then belong to the caller); None when this preload has none for it or its read failed."""
        ready = self._ready.get(str(folder))
        if ready is None:
            return None
        ready.wait()
        with self._lock:
            return self._states.pop(str(folder), None)

    def _run(self) -> None:
        import torch

        started = time.perf_counter()
        try:
            reader = DeviceReader(torch.device(self.device))
        except Exception as error:  # no pinned memory, no device: every component is left to the loader
            logger.warning("could not start the preload (from_pretrained will load it all): %s", error)
            for ready in self._ready.values():
                ready.set()
            return
        for folder in self.folders:
            key = str(folder)
            state = reader.read_component(folder)
            if state is not None:
                self.seconds[key] = time.perf_counter() - started
            with self._lock:
                self._states[key] = state
            self._ready[key].set()


class DeviceReader:
    """Reads safetensors files into tensors of their own on ``device``: a file's bytes go through two
    alternating host buffers of ``chunk`` bytes into each tensor's bytes. On CUDA the buffers are pinned and
    the copies run on a stream of the reader's own, so reading the next chunk overlaps copying the last.
    Made on the thread that reads: on CUDA, ``device`` becomes that thread's current device."""

    def __init__(self, device: torch.device, chunk: int = _CHUNK) -> None:
        import torch

        self.device = device
        self.chunk = chunk
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(device)
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(2)]

    def read_component(self, folder: Path) -> dict[str, torch.Tensor] | None:
        """The state dict of a model folder's safetensors (``component_files``); None when they are not
        plain safetensors or cannot be read, which leaves the component to ``from_pretrained`` (a head start
        only: the loader reads it again and reports what is wrong with a file)."""
        files = component_files(folder)
        if files is None:
            return None
        state: dict[str, torch.Tensor] = {}
        try:
            for path in files:
                state.update(self.read(path))
        except Exception as error:
            logger.warning("could not preload %s (from_pretrained will load it): %s", folder, error)
            return None
        return state

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        import torch

        with open(path, "rb", buffering=0) as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header: dict[str, Any] = json.loads(file.read(header_size))
            header.pop("__metadata__", None)
            tensors: dict[str, torch.Tensor] = {}
            spans: list[tuple[int, int, torch.Tensor]] = []  # (begin, end) in the data, the tensor's bytes
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype = getattr(torch, _DTYPES[entry["dtype"]])
                raw = torch.empty(end - begin, dtype=torch.uint8, device=self.device)
                tensors[name] = raw.view(dtype).reshape(entry["shape"])
                spans.append((begin, end, raw))
            spans.sort(key=lambda span: span[0])
            self._copy(file, spans, max((end for _, end, _ in spans), default=0))
        return tensors

    def _copy(self, file: Any, spans: list[tuple[int, int, torch.Tensor]], size: int) -> None:
        import torch

        first = 0  # the first span not wholly copied yet (spans are disjoint and sorted)
        for index, offset in enumerate(range(0, size, self.chunk)):
            slot = index % 2
            if self.cuda:
                self.copied[slot].synchronize()  # the buffer's previous chunk has reached the device
            length = min(self.chunk, size - offset)
            buffer = self.buffers[slot]
            _read_exactly(file, memoryview(buffer.numpy()), length)
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                position = first
                while position < len(spans) and spans[position][0] < offset + length:
                    begin, end, raw = spans[position]
                    low, high = max(begin, offset), min(end, offset + length)
                    if high > low:
                        source = buffer[low - offset : high - offset]
                        raw[low - begin : high - begin].copy_(source, non_blocking=True)
                    if end <= offset + length:
                        first = position + 1
                    position += 1
                if self.cuda:
                    self.copied[slot].record(self.stream)
        if self.cuda:
            self.stream.synchronize()


def _read_exactly(file: Any, view: memoryview, length: int) -> None:
    done = 0
    while done < length:
        count = file.readinto(view[done:length])
        if not count:
            raise OSError(f"{file.name} ended {length - done} bytes early")
        done += count


def device_name(device: str | torch.device) -> str:
    """``device`` as the preloads are keyed: "cuda" with the calling thread's current device's index."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


_started: dict[str, Preload] = {}
_started_lock = threading.Lock()


def preload_checkpoint(
    model: str, device: str, cache_dir: str | Path | None = None, components: Sequence[str] = LOAD_ORDER
) -> Preload | None:
    """Start reading ``components`` of ``model`` (a local directory or a cached Hub repo) into ``device``
    memory, once per process and device; None when the checkpoint is not on disk yet. Tensors no engine
    takes (one that loads onto another device) stay in memory: start it for the device that will load."""
    directory = cached_checkpoint(model, cache_dir)
    if directory is None:
        return None
    device = device_name(device)
    key = f"{directory}|{device}"
    with _started_lock:
        started = _started.get(key)
        if started is None:
            started = _started[key] = Preload([directory / name for name in components], device).start()
        return started


def preload_on_gpu(model: str, device: str | None, cache_dir: str | Path | None = None) -> Preload | None:
    """``preload_checkpoint`` onto ``device`` (None: the current CUDA device) where that is a GPU that is
    attached; None elsewhere: on a CPU the loader's own reads cost the same, and while a memory snapshot is
    taken no GPU is attached yet (``Flux2Engine.load_on_cpu`` reads into host memory then)."""
    import torch

    target = device or "cuda"
    if not target.startswith("cuda") or not torch.cuda.is_available():
        return None
    return preload_checkpoint(model, target, cache_dir)


def take_preloaded(folder: Path, device: str | torch.device) -> dict[str, torch.Tensor] | None:
    """The state dict a preload started in this process read for ``folder`` on ``device`` (waiting for it),
    handed over once; None when no preload has it."""
    with _started_lock:
        preload = _started.get(f"{folder.parent}|{device_name(device)}")
    return preload.take(folder) if preload is not None else None
