"""A starting worker reads its checkpoint's weight files into the page cache while it imports torch and
diffusers; what it cannot or should not read it leaves to the loader, and the worker still starts."""

from __future__ import annotations

import os
from pathlib import Path

from inference.readahead import Readahead, checkpoint_readahead, read_ahead, settle, weight_files


def _checkpoint(root: Path) -> dict[str, Path]:
    """A diffusers-layout folder: weights per component, a single-file checkpoint beside them."""
    files = {
        "transformer": root / "transformer" / "diffusion_pytorch_model.safetensors",
        "text_encoder": root / "text_encoder" / "model-00001-of-00002.safetensors",
        "text_encoder_2": root / "text_encoder" / "model-00002-of-00002.safetensors",
        "vae": root / "vae" / "diffusion_pytorch_model.safetensors",
    }
    sizes = {"transformer": 9 << 20, "text_encoder": 5 << 20, "text_encoder_2": 300 << 10, "vae": 1 << 20}
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(sizes[name]))
    (root / "text_encoder" / "config.json").write_text("{}")
    (root / "flux-2-klein-4b.safetensors").write_bytes(os.urandom(1 << 20))  # not the loader's
    return files


def test_every_component_weight_file_is_read_in_the_order_the_loader_wants_it(tmp_path: Path) -> None:
    files = _checkpoint(tmp_path)
    # The VAE and the transformer load first, the text encoder beside the warm-up (checkpoint.py).
    assert weight_files(tmp_path) == [
        files["vae"],
        files["transformer"],
        files["text_encoder"],
        files["text_encoder_2"],
    ]  # no config, no single-file checkpoint beside them
    # Components the loader has no order for: largest first, so the readers start on what takes longest.
    assert weight_files(tmp_path, first=()) == [
        files["transformer"],
        files["text_encoder"],
        files["vae"],
        files["text_encoder_2"],
    ]
    readahead = checkpoint_readahead(str(tmp_path))
    assert readahead.done.wait(30)
    assert readahead.skipped is None
    assert readahead.bytes_read == readahead.total_bytes == sum(p.stat().st_size for p in files.values())
    assert readahead.seconds is not None
    assert readahead.seconds >= 0
    # Asked again (another engine replica of the same worker), the same reads are not started twice.
    assert checkpoint_readahead(str(tmp_path)) is readahead


def test_settling_waits_for_every_read_started(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    readahead = checkpoint_readahead(str(tmp_path))
    assert settle(timeout=30)  # what a memory snapshot waits for before it is taken
    assert readahead.done.is_set()
    assert readahead.bytes_read == readahead.total_bytes


def test_weights_that_do_not_fit_in_free_memory_are_left_to_the_loader(tmp_path: Path) -> None:
    files = _checkpoint(tmp_path)
    readahead = Readahead(weight_files(tmp_path), free_memory=sum(p.stat().st_size for p in files.values()))
    readahead.start()
    assert readahead.done.is_set()
    assert readahead.bytes_read == 0
    assert readahead.skipped is not None
    assert "do not fit in free memory" in readahead.skipped


def test_a_file_that_cannot_be_read_is_skipped_and_the_rest_is_read(tmp_path: Path, caplog) -> None:
    files = _checkpoint(tmp_path)
    readahead = Readahead(weight_files(tmp_path))
    files["vae"].unlink()  # gone between listing and reading: the loader will say what is missing
    readahead.start()
    assert readahead.done.wait(30)
    readable = [path for name, path in files.items() if name != "vae"]
    assert readahead.bytes_read == sum(path.stat().st_size for path in readable)
    assert "could not read" in caplog.text
    assert "diffusion_pytorch_model" in caplog.text


def test_a_model_not_on_disk_yet_is_not_downloaded_here(tmp_path: Path) -> None:
    readahead = checkpoint_readahead("black-forest-labs/FLUX.2-klein-4B", cache_dir=tmp_path)
    assert readahead.done.is_set()
    assert readahead.skipped == "no weight files"
    assert list(tmp_path.iterdir()) == []  # nothing fetched into the cache
    assert read_ahead([]) is read_ahead([])
