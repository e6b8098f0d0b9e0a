"""The CPU preview engine: every studio preset looks different, unknown prompts still get a picture, and it
keeps up with a webcam on one core."""

from __future__ import annotations

import io
import itertools
import time

import numpy as np
import pytest
from PIL import Image

from inference.engines import create_engine, is_preview
from inference.engines.base import Engine, FrameJob
from inference.engines.preview import DEFAULT_STYLE, STYLES, PreviewEngine, style_for_prompt
from tests.inference.helpers import mean_abs_diff, webcam_jpeg, worker_config

# The studio's presets, as a person would phrase them.
PRESETS = {
    "oil": "an oil painting, thick brushstrokes",
    "clay": "claymation figure",
    "render_3d": "3D render, soft studio lighting",
    "game": "video game character",
    "low_poly": "low poly art",
    "pixel_art": "pixel art, 16-bit",
    "anime": "anime portrait",
    "ukiyo_e": "ukiyo-e woodblock print",
    "neon": "neon cyberpunk",
}


@pytest.fixture(scope="module")
def engine() -> PreviewEngine:
    warmed = PreviewEngine()
    warmed.warm_up()
    return warmed


def test_it_is_an_engine_labelled_as_a_preview() -> None:
    engine = create_engine(worker_config(engine="preview"))
    assert isinstance(engine, Engine)
    assert engine.name == "preview"
    assert is_preview(engine)
    assert "not ai" in engine.model.lower()


@pytest.mark.parametrize(("style", "prompt"), PRESETS.items())
def test_each_preset_selects_its_style(style: str, prompt: str) -> None:
    assert style_for_prompt(prompt) == style
    assert style_for_prompt(prompt.upper()) == style


def test_keywords_match_whole_words_from_their_start() -> None:
    assert style_for_prompt("a cat astronaut") == DEFAULT_STYLE  # not "tron" (neon)
    assert style_for_prompt("glowing signs") == "neon"
    assert style_for_prompt("pixel art game character") == "pixel_art"  # the more specific one wins
    assert style_for_prompt("") == DEFAULT_STYLE


def test_every_preset_looks_different(engine: PreviewEngine) -> None:
    jpeg = webcam_jpeg()
    outputs = {style: engine.render_one(jpeg, prompt) for style, prompt in PRESETS.items()}
    for (a, out_a), (b, out_b) in itertools.combinations(outputs.items(), 2):
        assert mean_abs_diff(out_a, out_b) > 8, f"{a} and {b} look alike"
    for style, output in outputs.items():
        assert mean_abs_diff(output, engine.render_one(jpeg, "")) > 8, f"{style} looks like the default"


def test_unknown_prompts_get_a_default_that_still_follows_the_prompt(engine: PreviewEngine) -> None:
    jpeg = webcam_jpeg()
    cat = engine.render_one(jpeg, "a cat astronaut")
    castle = engine.render_one(jpeg, "a castle on a hill at dawn")
    assert mean_abs_diff(cat, castle) > 8
    assert engine.render_one(jpeg, "a cat astronaut") == cat  # deterministic: no flicker between frames
    blue_gold = engine.render_one(jpeg, "a blue and gold poster")
    picture = Image.open(io.BytesIO(blue_gold)).convert("RGB").resize((64, 64))
    pixels = np.asarray(picture, dtype=np.float32)
    assert pixels[..., 2].mean() > pixels[..., 1].mean(), "colour words in the prompt steer the palette"


def test_render_returns_one_512_jpeg_per_job_in_order(engine: PreviewEngine) -> None:
    jobs = [
        FrameJob("a", 1, webcam_jpeg(640, 480), "pixel art", 2, 0),
        FrameJob("b", 2, webcam_jpeg(1280, 720), "neon", 2, 0),
        FrameJob("c", 3, webcam_jpeg(480, 640), "anime", 2, 0),
    ]
    outputs = engine.render(jobs)
    assert len(outputs) == 3
    for job, output in zip(jobs, outputs, strict=True):
        assert Image.open(io.BytesIO(output)).size == (512, 512)
        assert output == engine.render_one(job.jpeg, job.prompt)


def test_the_configured_delay_slows_each_render() -> None:
    slow = create_engine(worker_config(preview_delay_seconds=0.2))
    started = time.perf_counter()
    slow.render([FrameJob("a", 1, webcam_jpeg(160, 120), "anime", 2, 0)])
    assert time.perf_counter() - started >= 0.2


@pytest.mark.parametrize("style", sorted(STYLES))
def test_each_style_runs_at_15_fps_or_more_on_one_core(engine: PreviewEngine, style: str) -> None:
    # CPU time of this thread, best of a few: robust against other processes sharing the machine.
    prompt = next((p for s, p in PRESETS.items() if s == style), style.replace("_", " "))
    assert style_for_prompt(prompt) == style
    jpeg = webcam_jpeg(640, 480)
    best = min(_cpu_seconds(lambda: engine.render_one(jpeg, prompt)) for _ in range(4))
    assert best < 1 / 15, f"{style}: {best * 1000:.0f} ms per frame"


def _cpu_seconds(work: object) -> float:
    started = time.thread_time()
    work()  # type: ignore[operator]
    return time.thread_time() - started
