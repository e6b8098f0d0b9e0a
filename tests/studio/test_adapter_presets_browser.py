"""The studio's adapter presets and Style strength slider in headless Chromium with a fake webcam, against
`python -m app` in sandbox mode. The preview engine cannot run a LoRA; it serves the names FLUX2_LORAS
configures and stands in for each with a colour cast whose strength follows the adapter's scale."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.conftest import AppProcess, save_screenshot
from tests.studio.wire import WireLog, difference, output_colour, start_streaming, wait_until

pytestmark = pytest.mark.browser


def _last_params(wire: WireLog) -> dict[str, Any]:
    sent = wire.last_params()
    assert sent is not None, "the studio sent no params"
    return sent[0]


def test_adapter_presets_follow_the_workers_adapters_and_the_strength_slider_moves_the_style(
    start_app: Callable[..., AppProcess], page: Any
) -> None:
    # The worker serves "clay" (default scale 0.6), not "ink" or "painter": only the clay preset shows.
    app = start_app(FLUX2_LORAS="clay=./clay.safetensors;scale=0.6;trigger=claymation")
    wire = start_streaming(page, app, "lora@example.com")
    clay, ink = page.locator("[data-testid=preset-lora-clay]"), page.locator("[data-testid=preset-lora-ink]")
    slider = page.locator("[data-testid=adapter-scale]")
    expect(clay).to_be_visible()
    expect(ink).to_be_hidden()
    expect(page.locator("[data-testid=preset-lora-painter]")).to_be_hidden()
    expect(slider).to_be_hidden()
    assert [a["name"] for a in wire.messages("ready")[-1]["adapters"]] == ["clay"]

    def settle(what: str) -> list[float]:
        seen = wire.frames()
        wait_until(page, lambda: wire.frames() >= seen + 6, 20, what)
        return output_colour(page)

    clay.click()
    # The slider appears at the adapter's default from `ready`, and the preset's prompt and adapter go out.
    expect(slider).to_be_visible()
    expect(slider).to_have_value("0.6")
    wait_until(page, lambda: _last_params(wire).get("adapter") == "clay", 10, "params with the adapter")
    params = _last_params(wire)
    assert params["adapter_scale"] == pytest.approx(0.6)
    assert params["prompt"] == clay.get_attribute("data-prompt")
    weak = settle("frames at the default strength")
    weak_later = settle("more frames at the default strength")
    motion = max(difference(weak, weak_later), 2.0)

    # Dragging the slider (range inputs cannot be typed into: set it and fire `input` as a drag does).
    slider.evaluate("(el) => { el.value = '2'; el.dispatchEvent(new Event('input', { bubbles: true })); }")
    wait_until(page, lambda: _last_params(wire).get("adapter_scale") == 2, 10, "params with the new scale")
    strong = settle("frames at full strength")
    save_screenshot(page, "studio-adapter-strength")
    assert difference(weak, strong) > 3 * motion

    # A preset without an adapter turns it off: the slider goes, and the cast with it.
    page.click("[data-testid=preset-oil]")
    expect(slider).to_be_hidden()
    wait_until(page, lambda: _last_params(wire).get("adapter", "") is None, 10, "params turning it off")
    assert "adapter_scale" not in _last_params(wire)
    assert not wire.messages("error")
    assert len(wire.sockets) == 1  # all of it live, on one socket
