"""The studio's style presets: one click sets the prompt. Defined once; the studio page renders them."""

from __future__ import annotations

import msgspec


class StylePreset(msgspec.Struct, frozen=True):
    id: str
    label: str
    prompt: str


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
)

DEFAULT_PRESET = STYLE_PRESETS[0]
