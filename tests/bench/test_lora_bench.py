"""The lora bench section's adapters are what it says: LoRAs on every attention and MLP linear of the
blocks, which the worker's own loader (diffusers' load_lora_weights) reads, and which change the frame."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.lora import RANK, adapter_targets, write_random_adapters
from inference.adapters import AdapterSpec
from inference.engines.base import FrameJob
from inference.engines.flux2 import create_flux2_engine
from inference.engines.flux2.klein_config import TINY, build_random_components
from tests.inference.helpers import mean_abs_diff, webcam_jpeg


def test_the_bench_adapters_load_through_the_worker_path_and_change_the_frame(tmp_path: Path) -> None:
    transformer = build_random_components(TINY, device="cpu", dtype=torch.float32, seed=0)["transformer"]
    targets = adapter_targets(transformer)
    assert any(".attn.to_q" in name for name in targets)
    assert any(".ff.linear_in" in name for name in targets)
    assert any(name.startswith("single_transformer_blocks.") for name in targets)
    paths = write_random_adapters(transformer, tmp_path, 2)
    assert len(paths) == 2
    assert all(path.is_file() for path in paths)

    specs = tuple(AdapterSpec(f"lora{i}", str(path)) for i, path in enumerate(paths))
    engine = create_flux2_engine(tiny=True, device="cpu", max_batch=2, modes=("exact",), loras=specs)
    engine.load()
    bank = engine.transformers.lora.bank
    assert set(bank.targets) == set(targets)
    assert {target.rank for layer in bank.targets.values() for target in layer.values()} == {RANK}
    job = FrameJob("s", 1, webcam_jpeg(), "a prompt", 1, 7)
    plain, active = engine.render([job, FrameJob("t", 1, job.jpeg, job.prompt, 1, 7, adapter="lora0")])
    assert mean_abs_diff(plain, active) > 0.0
