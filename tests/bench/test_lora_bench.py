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


def test_the_summary_reports_each_case_against_the_engine_without_lora_support() -> None:
    from bench.gpu import Row, format_lora_summary

    def row(phase: str, case: str, ms: float, max_abs: float | None = None) -> Row:
        return Row(phase, case, 2, 1, [ms, ms, ms], max_abs=max_abs, psnr_db=40.0 if max_abs else None)

    rows = [
        row("lora0:exact", "render", 70.0),
        row("lora1:exact", "render", 70.7),
        row("lora1:exact", "render+lora", 77.0),
        row("lora1:exact", "frames+lora", 71.0, max_abs=0.04),
        row("lora4:exact", "render+switch", 105.0),
        Row("lora4:exact", "render+lora", 2, 1, [], error="RuntimeError: out of memory"),
    ]
    lines = format_lora_summary(rows)

    def line(label: str) -> list[str]:
        found = [text.split() for text in lines if label in text]
        return found[0] if found else []

    assert line("1 loaded, one active")[-4:] == ["77.00", "ms", "+10.0", "%"]
    assert line("1 loaded, none active")[-4:] == ["70.70", "ms", "+1.0", "%"]
    assert line("4 loaded, switching")[-4:] == ["105.00", "ms", "+50.0", "%"]
    assert "4.0e-02," in line("lora1:exact: adapter lora0 vs diffusers' set_adapters")
    # A failed case is left out rather than reported as a figure.
    assert line("4 loaded, one active") == []
    assert format_lora_summary([row("mode:exact", "render", 70.0)]) == []
