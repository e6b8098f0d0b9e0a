"""Choosing an engine by name: the preview worker never pays for torch, and the worker's settings reach the
FLUX.2 engine under names its factory accepts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from inference.config import WorkerConfig
from inference.engines import flux2_options
from tests.inference.helpers import SECRET

ROOT = Path(__file__).resolve().parents[3]


def test_the_preview_worker_does_not_import_torch() -> None:
    program = (
        "import sys\n"
        "from inference.config import WorkerConfig\n"
        "from inference.engines import create_engine\n"
        "from inference.server import create_inference_app\n"
        f"config = WorkerConfig(stream_secret={SECRET!r})\n"
        "create_inference_app(config)\n"
        "create_engine(config).warm_up()\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_flux2_options_are_fields_of_the_flux2_engine_config() -> None:
    # Read from the source rather than imported: importing torch and diffusers takes many seconds.
    tree = ast.parse((ROOT / "inference/engines/flux2/config.py").read_text())
    config_class = next(
        node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == "Flux2Config"
    )
    accepted = {
        node.target.id
        for node in config_class.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    config = WorkerConfig(
        stream_secret=SECRET,
        engine="flux2",
        cache_dir="/cache",
        device="cuda:1",
        dtype="bfloat16",
        weights="tiny",
    )
    options = flux2_options(config)
    assert set(options) <= accepted
    assert options["tiny"] is True
    assert options["device"] == "cuda:1"
