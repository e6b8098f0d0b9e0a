"""The preview engine's stand-in for LoRA adapters: it serves the names FLUX2_LORAS configures, each as a
colour cast that grows with the adapter's scale, and refuses a name it does not serve. And the studio's
adapter presets refuse what no worker could serve."""

from __future__ import annotations

import pytest

from app.presets import STYLE_PRESETS, StylePreset
from inference.engines import create_engine
from inference.engines.base import FrameJob, served_adapters
from inference.engines.preview import PreviewEngine
from inference.protocol import AdapterInfo
from tests.inference.helpers import mean_abs_diff, webcam_jpeg, worker_config

PROMPT = "an oil painting, thick brushstrokes"


@pytest.fixture(scope="module")
def engine() -> PreviewEngine:
    built = create_engine(
        worker_config(loras="clay=./clay.safetensors;scale=0.6;trigger=claymation,ink=a/b:c", max_batch=8)
    )
    assert isinstance(built, PreviewEngine)
    return built


def _job(adapter: str | None = None, scale: float | None = None) -> FrameJob:
    return FrameJob("s", 1, webcam_jpeg(), PROMPT, 1, 42, adapter=adapter, adapter_scale=scale)


def test_it_serves_the_configured_adapters_and_none_without_the_setting(engine: PreviewEngine) -> None:
    assert served_adapters(engine) == (
        AdapterInfo(name="clay", scale=0.6, trigger="claymation"),
        AdapterInfo(name="ink", scale=1.0, trigger=""),
    )
    assert served_adapters(create_engine(worker_config())) == ()


def test_the_cast_grows_with_the_scale_and_the_default_is_the_adapters(engine: PreviewEngine) -> None:
    plain, off, default, explicit, full = engine.render(
        [_job(), _job("clay", 0.0), _job("clay"), _job("clay", 0.6), _job("clay", 2.0)]
    )
    assert mean_abs_diff(plain, off) < 1.0  # scale 0: no effect, as for a LoRA
    assert mean_abs_diff(default, explicit) < 1.0
    assert mean_abs_diff(plain, default) > 5.0
    assert mean_abs_diff(plain, full) > 2 * mean_abs_diff(plain, default)


def test_each_adapter_has_its_own_look(engine: PreviewEngine) -> None:
    clay, ink = engine.render([_job("clay", 2.0), _job("ink", 2.0)])
    assert mean_abs_diff(clay, ink) > 5.0


def test_an_adapter_it_does_not_serve_is_refused(engine: PreviewEngine) -> None:
    with pytest.raises(ValueError, match="painter"):
        engine.render([_job("painter", 1.0)])
    with pytest.raises(ValueError, match="clay"):
        create_engine(worker_config()).render([_job("clay", 1.0)])


def test_presets_name_adapters_the_protocol_accepts() -> None:
    assert any(preset.adapter for preset in STYLE_PRESETS)
    with pytest.raises(ValueError, match="adapter"):
        StylePreset("x", "X", "a prompt", adapter="Not A Name")
    with pytest.raises(ValueError, match="adapter_scale"):
        StylePreset("x", "X", "a prompt", adapter="clay", adapter_scale=2.5)
    with pytest.raises(ValueError, match="without an adapter"):
        StylePreset("x", "X", "a prompt", adapter_scale=1.0)
