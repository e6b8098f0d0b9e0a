"""A starting worker reads its first components' safetensors into device memory while it imports diffusers:
byte for byte what safetensors itself loads, whatever the dtypes, shards and read sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.preload import DeviceReader, Preload, component_files, preload_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(33, 17, generator=generator).to(torch.bfloat16),
        "blocks.0.bias": torch.randn(17, generator=generator),
        "half": torch.randn(5, 3, generator=generator).to(torch.float16),
        "mask": torch.rand(7, generator=generator) > 0.5,  # 7 bytes: the next tensor starts at an odd offset
        "fp8": torch.randn(9, 4, generator=generator).to(torch.float8_e4m3fn),
        "steps": torch.arange(11, dtype=torch.int64),
        "pixels": torch.randint(0, 255, (3, 3), dtype=torch.uint8, generator=generator),
        "scale": torch.tensor(0.5),  # a 0-d tensor
    }


def _same(read: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype, name
        assert read[name].shape == tensor.shape, name
        assert torch.equal(read[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            name
        )


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_a_file_read_in_chunks_of_any_size_is_what_safetensors_loads(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "weights.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    read = DeviceReader(torch.device("cpu"), chunk=chunk).read(path)
    _same(read, load_file(path))
    # Each tensor owns its storage, as a loaded model's weights do: none keeps a whole file alive.
    assert len({tensor.untyped_storage().data_ptr() for tensor in read.values()}) == len(read)


def test_a_sharded_component_is_read_from_every_shard_of_its_index(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint" / "transformer"
    folder.mkdir(parents=True)
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for shard, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, folder / shard)
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert component_files(folder) == [folder / shard for shard in sorted(shards)]
    preload = Preload([folder], "cpu").start()
    state = preload.take(folder)
    assert state is not None
    _same(state, tensors)
    assert preload.take(folder) is None  # handed over once
    assert "transformer" in str(next(iter(preload.seconds)))


def test_what_the_preload_cannot_read_is_left_to_the_loader(tmp_path: Path, caplog) -> None:
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "vae").mkdir(parents=True)
    (checkpoint / "transformer").mkdir()
    (checkpoint / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not safetensors")  # another format
    (checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00")  # cut short
    assert component_files(checkpoint / "vae") is None
    preload = preload_checkpoint(str(checkpoint), "cpu")
    assert preload is not None
    assert preload.take(checkpoint / "vae") is None
    with caplog.at_level("WARNING", logger="inference.preload"):
        assert preload.take(checkpoint / "transformer") is None
    assert "from_pretrained will load it" in caplog.text
    # Not on disk (not downloaded yet): nothing to preload.
    assert preload_checkpoint(str(tmp_path / "absent"), "cpu") is None


def test_a_preload_that_cannot_start_leaves_every_component_to_the_loader(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "checkpoint" / "vae"
    folder.mkdir(parents=True)
    save_file(_tensors(), folder / "diffusion_pytorch_model.safetensors")
    with caplog.at_level("WARNING", logger="inference.preload"):
        preload = Preload([folder], "no-such-device").start()
        assert preload.take(folder) is None  # answered at once, not waited for forever
    assert "from_pretrained will load it all" in caplog.text
