from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inference.config import WorkerConfig, WorkerConfigError, load_worker_config
from inference.engines import flux2_options
from tests.inference.helpers import SECRET


def test_defaults_need_only_the_stream_secret() -> None:
    config = load_worker_config({"STREAM_SECRET": SECRET})
    assert config.stream_secret == SECRET
    assert config.engine == "preview"
    assert config.usage_report_url is None  # reporting off
    assert config.default_steps == 2
    assert config.worker_id


def test_the_environment_is_read_and_converted() -> None:
    config = load_worker_config(
        {
            "STREAM_SECRET": SECRET,
            "INFERENCE_ENGINE": "flux2",
            "WORKER_ID": "gpu-7",
            "USAGE_REPORT_URL": "https://app.example/api/usage/report",
            "DEFAULT_STEPS": "4",
            "MAX_BATCH": "8",
            "FLUX2_MODEL_PATH": "/models/klein",
            "MODEL_CACHE_DIR": "/cache",
            "FLUX2_COMPILE": "true",
            "PREVIEW_DELAY_MS": "250",
        }
    )
    assert (config.engine, config.worker_id, config.default_steps, config.max_batch) == (
        "flux2",
        "gpu-7",
        4,
        8,
    )
    assert config.usage_report_url == "https://app.example/api/usage/report"
    assert config.preview_delay_seconds == 0.25
    assert config.compile is True
    assert flux2_options(config) == {
        "model": "/models/klein",
        "cache_dir": "/cache",
        "steps": 4,
        "max_batch": 8,
        "compile": True,
        "modes": ("exact", "fast", "turbo"),
        "random_weights": False,
        "tiny": False,
    }


def test_cli_overrides_win() -> None:
    assert load_worker_config(
        {"STREAM_SECRET": SECRET, "INFERENCE_ENGINE": "flux2"}, engine="preview"
    ).engine == ("preview")


def test_a_missing_secret_is_named() -> None:
    with pytest.raises(WorkerConfigError, match="STREAM_SECRET"):
        load_worker_config({"INFERENCE_ENGINE": "preview"})


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(WorkerConfigError, match="at least 32 bytes"):
        load_worker_config({"STREAM_SECRET": "short"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INFERENCE_ENGINE", "dalle"),
        ("DEFAULT_STEPS", "9"),
        ("MAX_BATCH", "many"),
        ("PREVIEW_DELAY_MS", "slow"),
    ],
)
def test_bad_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(WorkerConfigError, match=name):
        load_worker_config({"STREAM_SECRET": SECRET, name: value})


def test_config_is_validated_when_built_in_code_too() -> None:
    with pytest.raises(WorkerConfigError):
        WorkerConfig(stream_secret=SECRET, default_steps=0)


def test_the_command_line_explains_a_missing_secret() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inference", "--port", "1"],
        cwd=Path(__file__).resolve().parents[2],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "STREAM_SECRET" in result.stderr
