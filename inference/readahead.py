"""Read a checkpoint's weight files into the page cache while the worker is still importing its libraries.

A starting worker spends seconds importing torch, transformers and diffusers (CPU-bound, one thread) and
then seconds reading ~16 GB of safetensors (bound by the disk); done one after the other, both add up.
Started first, a few reader threads pull the files into the page cache in large parallel reads (more
throughput than the loader's one tensor at a time) while the imports run, and the loader then reads
memory. Nothing here imports torch, so it can start before torch does.

The reads are only a hint to the kernel: if the files do not fit in the memory that is free, nothing is
read (the loader would read them from disk again anyway), and a file that cannot be read is skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

READERS: Final = 4  # parallel reads: more than one keeps the disk's queue full (a VM disk: 1.4 -> 1.9 GB/s)
_CHUNK: Final = 64 << 20  # one read call
_RANGE: Final = 256 << 20  # the share of a file one reader takes at a time
_WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".pt", ".pth")
# Of the memory the kernel reports available, how much the files may take: the loader needs some too.
_MEMORY_SHARE: Final = 0.8
# The order a checkpoint's components are loaded in (inference/engines/flux2/checkpoint.py): the text
# encoder loads beside the warm-up, so its bytes are wanted last.
LOAD_ORDER: Final = ("vae", "transformer", "text_encoder")


def weight_files(directory: str | Path, first: Sequence[str] = LOAD_ORDER) -> list[Path]:
    """The weight files of the components of the diffusers checkpoint in ``directory`` (one folder per
    component; files beside them, such as a repo's single-file checkpoints, are not the loader's) in the
    order the loader wants them: those of the components in ``first``, in that order, then the others
    largest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    files = [path for path in root.glob("*/**/*") if path.suffix in _WEIGHT_SUFFIXES and path.is_file()]

    def order(path: Path) -> tuple[int, int]:
        component = path.relative_to(root).parts[0]
        rank = first.index(component) if component in first else len(first)
        return rank, -path.stat().st_size

    return sorted(files, key=order)


def cached_checkpoint(model: str, cache_dir: str | Path | None) -> Path | None:
    """The local directory of ``model`` without downloading anything: itself when it is a directory, else
    its snapshot in the Hugging Face cache if one is there; None otherwise (the loader will download)."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            model,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            local_files_only=True,
        )
    except Exception:  # not cached yet (or no huggingface_hub): nothing to read ahead
        return None
    return Path(path)


def available_memory() -> int | None:
    """Bytes the kernel reports available (MemAvailable), None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Readahead:
    """Reader threads pulling ``files`` into the page cache; ``start()`` returns at once."""

    def __init__(
        self, files: Iterable[Path], *, readers: int = READERS, free_memory: int | None = None
    ) -> None:
        """``free_memory``: the bytes the files may take a share of; None: what the kernel reports."""
        self.files = list(files)
        self.readers = readers
        self._free_memory = free_memory
        self._sizes = {path: path.stat().st_size for path in self.files}
        self.total_bytes = sum(self._sizes.values())
        self.bytes_read = 0
        self.skipped: str | None = None  # why nothing was read, when nothing was
        self.seconds: float | None = None  # from start() until the last reader finished
        self.done = threading.Event()
        self._running = 0  # reader threads not finished yet
        self._lock = threading.Lock()
        self._ranges: queue.SimpleQueue[tuple[Path, int, int]] = queue.SimpleQueue()

    def start(self) -> Readahead:
        if not self.files:
            self.skipped = "no weight files"
        else:
            free = available_memory() if self._free_memory is None else self._free_memory
            if free is not None and self.total_bytes > _MEMORY_SHARE * free:
                self.skipped = f"{self.total_bytes / 2**30:.1f} GiB of weights do not fit in free memory"
        if self.skipped is not None:
            logger.info("not reading the checkpoint ahead: %s", self.skipped)
            self.seconds = 0.0
            self.done.set()
            return self
        for path, size in self._sizes.items():
            for offset in range(0, size, _RANGE):
                self._ranges.put((path, offset, min(_RANGE, size - offset)))
        started = time.perf_counter()
        self._running = self.readers

        def reader() -> None:
            buffer = bytearray(_CHUNK)
            try:
                self._read_ranges(memoryview(buffer))
            finally:
                with self._lock:
                    self._running -= 1
                    last = self._running == 0
                if last:
                    self.seconds = time.perf_counter() - started
                    logger.info(
                        "read %.1f GiB of weights ahead in %.1f s", self.bytes_read / 2**30, self.seconds
                    )
                    self.done.set()

        for index in range(self.readers):
            threading.Thread(target=reader, name=f"readahead-{index}", daemon=True).start()
        return self

    def _read_ranges(self, buffer: memoryview) -> None:
        while True:
            try:
                path, offset, length = self._ranges.get_nowait()
            except queue.Empty:
                return
            try:
                with open(path, "rb", buffering=0) as file:
                    file.seek(offset)
                    while length > 0:
                        count = file.readinto(buffer[: min(_CHUNK, length)])
                        if not count:
                            break
                        length -= count
                        with self._lock:
                            self.bytes_read += count
            except OSError as error:  # a hint only: the loader reports what cannot be read
                logger.warning("could not read %s ahead: %s", path, error)


_started: dict[tuple[str, ...], Readahead] = {}
_started_lock = threading.Lock()


def read_ahead(files: Sequence[Path]) -> Readahead:
    """Start reading ``files`` ahead, once per process for the same files (each engine replica of a
    multi-GPU worker asks for the same checkpoint)."""
    key = tuple(str(path) for path in files)
    with _started_lock:
        started = _started.get(key)
        if started is None:
            started = _started[key] = Readahead(files).start()
        return started


def settle(timeout: float | None = None) -> bool:
    """Wait until every read started in this process has finished (before a memory snapshot is taken, so
    none is caught mid-read); whether they all did within ``timeout`` seconds."""
    with _started_lock:
        started = list(_started.values())
    deadline = None if timeout is None else time.monotonic() + timeout
    for readahead in started:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not readahead.done.wait(left):
            return False
    return True


def checkpoint_readahead(model: str, cache_dir: str | Path | None = None) -> Readahead:
    """``read_ahead`` of the weight files of ``model`` (a local directory or a cached Hub repo)."""
    directory = cached_checkpoint(model, cache_dir)
    return read_ahead(weight_files(directory) if directory is not None else [])
