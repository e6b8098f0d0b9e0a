"""FLUX2_LORAS: what the worker accepts, and a clear refusal (naming the variable) for what it does not."""

from __future__ import annotations

import pytest

from inference.adapters import AdapterSpec, AdapterSpecError, parse_adapters
from inference.config import WorkerConfigError, load_worker_config
from inference.engines import flux2_options

SECRET = "s" * 32


def test_hub_and_local_adapters_with_scale_and_trigger_words() -> None:
    specs = parse_adapters(
        "clay=owner/repo:styles/clay.safetensors;scale=0.8;trigger=claymation style, ink=/m/ink.safetensors"
    )
    assert specs == (
        AdapterSpec("clay", "owner/repo", "styles/clay.safetensors", 0.8, "claymation style"),
        AdapterSpec("ink", "/m/ink.safetensors", None, 1.0, ""),
    )
    assert parse_adapters("") == ()
    config = load_worker_config({"STREAM_SECRET": SECRET, "FLUX2_LORAS": "ink=/m/ink.safetensors;scale=1.5"})
    assert flux2_options(config)["loras"] == (AdapterSpec("ink", "/m/ink.safetensors", None, 1.5, ""),)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("clay", "expected name=source"),
        ("Clay!=/m/a.safetensors", "must match"),
        ("clay=owner/repo", "neither a local file nor owner/repo:weight_name"),
        ("clay=/m/a.safetensors;scale=3", "between 0 and 2"),
        ("clay=/m/a.safetensors;scale=strong", "not a number"),
        ("clay=/m/a.safetensors;colour=red", "unknown option"),
        ("clay=/m/a.safetensors,clay=/m/b.safetensors", "unique"),
    ],
)
def test_bad_entries_are_refused_naming_the_variable(value: str, message: str) -> None:
    with pytest.raises(AdapterSpecError, match=message):
        parse_adapters(value)
    with pytest.raises(WorkerConfigError, match=f"FLUX2_LORAS: .*{message}"):
        load_worker_config({"STREAM_SECRET": SECRET, "FLUX2_LORAS": value})
