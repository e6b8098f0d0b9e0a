"""The studio's style presets: one click sets the prompt, and an adapter preset also a LoRA adapter.

A preset is a prompt plus, optionally, the name of a LoRA adapter and its strength. An adapter preset names
an adapter as the worker's ``FLUX2_LORAS`` does (``clay=...``); the studio shows it only while the worker's
``ready.adapters`` lists that name, and choosing it sends the prompt with ``adapter`` and ``adapter_scale``
(the preset's scale, or the adapter's default from ``ready`` when the preset gives none). Choosing a preset
without an adapter turns the adapter off. Defined once; the studio page renders them."""

from __future__ import annotations

import re

import msgspec

from inference.protocol import ADAPTER_ID_PATTERN, MAX_ADAPTER_SCALE, MIN_ADAPTER_SCALE


class StylePreset(msgspec.Struct, frozen=True):
    id: str
    label: str
    prompt: str
    adapter: str | None = None  # a FLUX2_LORAS name; None: the prompt alone
    adapter_scale: float | None = None  # MIN..MAX_ADAPTER_SCALE; None: the adapter's default

    def __post_init__(self) -> None:
        if self.adapter is not None and not re.match(ADAPTER_ID_PATTERN, self.adapter):
            raise ValueError(f"preset {self.id!r}: adapter {self.adapter!r} must match {ADAPTER_ID_PATTERN}")
        if (
            self.adapter_scale is not None
            and not MIN_ADAPTER_SCALE <= self.adapter_scale <= MAX_ADAPTER_SCALE
        ):
            raise ValueError(
                f"preset {self.id!r}: adapter_scale must be {MIN_ADAPTER_SCALE:g}..{MAX_ADAPTER_SCALE:g}"
            )
        if self.adapter_scale is not None and self.adapter is None:
            raise ValueError(f"preset {self.id!r}: adapter_scale without an adapter")


STYLE_PRESETS: tuple[StylePreset, ...] = (
    StylePreset("oil", "Oil painting", "an expressive oil painting, thick impasto brushwork, rich colour"),
    StylePreset("clay", "Clay", "a claymation character, soft plasticine texture, studio lighting"),
    StylePreset("render3d", "3D render", "a polished 3D render, subsurface scattering, soft lighting"),
    StylePreset("game", "Game hero", "a stylized battle-royale video game character, vibrant cel-shaded 3D"),
    StylePreset("lowpoly", "Low poly", "low poly art, flat-shaded geometric facets, pastel palette"),
    StylePreset("pixel", "Pixel art", "16-bit pixel art, limited palette, crisp pixels"),
    StylePreset("anime", "Anime", "hand-drawn anime film still, soft watercolour backgrounds, gentle light"),
    StylePreset("ukiyoe", "Ukiyo-e", "an ukiyo-e woodblock print, bold outlines, flat washi paper colours"),
    StylePreset("neon", "Neon cyberpunk", "neon cyberpunk portrait, magenta and cyan rim light, night city"),
    StylePreset("sketch", "Pencil sketch", "a graphite pencil sketch, cross-hatching, sketchbook paper"),
    # Adapter presets: shown only by a worker whose FLUX2_LORAS has an adapter of that name.
    StylePreset(
        "lora-clay", "Claymation", "a claymation character, plasticine, studio lighting", adapter="clay"
    ),
    StylePreset("lora-ink", "Ink wash", "a sumi-e ink wash painting, loose brush, rice paper", adapter="ink"),
    StylePreset(
        "lora-painter",
        "Painter's hand",
        "a painted portrait, visible brushwork",
        adapter="painter",
        adapter_scale=0.8,
    ),
)

DEFAULT_PRESET = STYLE_PRESETS[0]
