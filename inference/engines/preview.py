"""The `preview` engine: classical image filters on the CPU, standing in for FLUX.2 where no GPU is
available (sandbox, CI, development). Output is labelled as a preview, both in the `ready` message and
with a badge in the frame, so nobody mistakes it for the model.

The style is chosen from the prompt by keywords covering the studio's presets; a prompt matching none of
them gets a duotone poster whose two colours come from colour words in the prompt or, failing that, from a
hash of it, so that every prompt change is visible. `steps` and `seed` do not affect the filters. A
session's style image recolours the result with the style image's palette (its colour statistics, per
channel), a stand-in for what the model does with a style image, labelled as a preview like the rest.

LoRA adapters cannot run here, but the preview serves the names ``FLUX2_LORAS`` configures (nothing is
read from their sources) so the studio's adapter presets and strength slider can be tried without a GPU:
each adapter stands in as a colour cast of its own (from a hash of its name), laid over the styled frame
``scale / MAX_ADAPTER_SCALE`` of the way.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Final

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from inference.engines.base import FrameJob
from inference.imaging import decode_square, encode_jpeg
from inference.protocol import MAX_ADAPTER_SCALE, OUTPUT_SIZE, AdapterInfo, RenderMode
from inference.style_image import StyleImage

if TYPE_CHECKING:
    from inference.config import WorkerConfig

Filter = Callable[[Image.Image, str], Image.Image]
HALF: Final = OUTPUT_SIZE // 2
_RNG_SEED: Final = 20_260_521  # fixed: textures must not flicker between frames

# (style, keywords), most specific first: "pixel art game character" is pixel art, not a game render.
STYLE_KEYWORDS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("low_poly", ("low poly", "low-poly", "lowpoly", "polygon", "faceted")),
    ("pixel_art", ("pixel", "8-bit", "8 bit", "16-bit", "16 bit", "sprite")),
    ("ukiyo_e", ("ukiyo", "woodblock", "hokusai", "edo period", "japanese print")),
    ("neon", ("neon", "cyberpunk", "synthwave", "tron", "glow")),
    ("clay", ("clay", "plasticine", "stop motion", "stop-motion", "play-doh")),
    ("render_3d", ("3d", "render", "pixar", "cgi", "octane", "blender")),
    ("anime", ("anime", "manga", "ghibli", "cel shad", "cel-shad")),
    ("oil", ("oil", "painting", "impasto", "van gogh", "brushstroke")),
    ("game", ("game", "video game", "fortnite", "unreal", "character")),
    ("sketch", ("sketch", "pencil", "charcoal", "drawing", "line art")),
    ("sepia", ("sepia", "vintage", "old photo", "daguerreotype", "1900s")),
)
DEFAULT_STYLE: Final = "duotone"

_COLOUR_WORDS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (200, 40, 50),
    "orange": (240, 130, 30),
    "yellow": (245, 210, 60),
    "gold": (212, 170, 60),
    "green": (50, 160, 80),
    "teal": (30, 150, 150),
    "blue": (40, 80, 200),
    "purple": (120, 50, 170),
    "pink": (240, 110, 170),
    "white": (245, 245, 240),
    "black": (20, 20, 25),
}
_DUOTONE_PAIRS: Final[tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]] = (
    ((25, 30, 80), (250, 200, 90)),
    ((70, 15, 60), (120, 230, 210)),
    ((10, 60, 50), (250, 160, 140)),
    ((40, 20, 10), (170, 220, 250)),
    ((30, 40, 30), (240, 240, 120)),
    ((80, 10, 20), (250, 220, 200)),
)


# Keywords match at the start of a word: "glowing" is neon, "astronaut" is not "tron".
_STYLE_PATTERNS: Final = tuple(
    (style, re.compile("|".join(rf"\b{re.escape(keyword)}" for keyword in keywords)))
    for style, keywords in STYLE_KEYWORDS
)


def style_for_prompt(prompt: str) -> str:
    text = prompt.lower()
    for style, pattern in _STYLE_PATTERNS:
        if pattern.search(text):
            return style
    return DEFAULT_STYLE


# ---- building blocks (numpy arrays are HxWx3 uint8 unless named otherwise) ----


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def _image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB")


def _find_edges(gray: Image.Image) -> Image.Image:
    """Edge strength of a grayscale image, without the false edge Pillow's kernel finds at the border."""
    edges = gray.filter(ImageFilter.FIND_EDGES)
    inner = edges.crop((2, 2, edges.width - 2, edges.height - 2))
    framed = Image.new("L", edges.size, 0)
    framed.paste(inner, (2, 2))
    return framed


def _edge_mask(image: Image.Image, threshold: int, *, thick: bool = False) -> np.ndarray:
    """Boolean OUTPUT_SIZE² mask of strong edges, found at half resolution (cheaper, and ignores noise)."""
    gray = image.convert("L").resize((HALF, HALF), Image.Resampling.BILINEAR)
    edges = _find_edges(gray.filter(ImageFilter.SMOOTH_MORE))
    if thick:
        edges = edges.filter(ImageFilter.MaxFilter(3))
    edges = edges.resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.BILINEAR)
    return _array(edges) > threshold


def _smooth(image: Image.Image, radius: float) -> Image.Image:
    """Blur at half resolution: the flat areas cartoon styles need, at a quarter of the cost."""
    small = image.resize((HALF, HALF), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(radius))
    return small.resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.BILINEAR)


def _posterize_hsv(image: Image.Image, value_levels: int, saturation: float, value_floor: int) -> Image.Image:
    """Flat bands of brightness with boosted saturation, keeping each region's hue."""
    hsv = _array(image.convert("HSV")).copy()
    step = 256 // value_levels
    value = (hsv[..., 2].astype(np.int32) // step) * step + step // 2  # int32: no uint8 wrap-around
    hsv[..., 2] = np.clip(value, value_floor, 255).astype(np.uint8)
    hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * saturation, 0, 255).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


@cache
def _vignette() -> np.ndarray:
    y, x = np.mgrid[-1 : 1 : OUTPUT_SIZE * 1j, -1 : 1 : OUTPUT_SIZE * 1j]
    return (1.0 - 0.35 * np.clip(x * x + y * y - 0.25, 0, None))[..., None].astype(np.float32)


@cache
def _paper_texture() -> np.ndarray:
    noise = np.random.default_rng(_RNG_SEED).normal(0, 9, (OUTPUT_SIZE, OUTPUT_SIZE)).astype(np.float32)
    fibres = np.asarray(
        Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8), "L").filter(ImageFilter.BoxBlur(1))
    )
    return (fibres.astype(np.float32) - 128)[..., None]


@cache
def _neon_gradient() -> np.ndarray:
    t = np.linspace(0, 1, OUTPUT_SIZE, dtype=np.float32)[None, :, None]
    magenta = np.array([255, 40, 200], dtype=np.float32)
    cyan = np.array([40, 230, 255], dtype=np.float32)
    return np.broadcast_to(magenta * (1 - t) + cyan * t, (OUTPUT_SIZE, OUTPUT_SIZE, 3))


@cache
def _triangles(cell: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """Low-poly mesh: a triangle id for every pixel (cells split along alternating diagonals) and a fixed
    per-triangle brightness jitter that makes the facets read as lit planes."""
    y, x = np.mgrid[0:OUTPUT_SIZE, 0:OUTPUT_SIZE]
    row, col = y // cell, x // cell
    fy, fx = (y % cell) / cell, (x % cell) / cell
    flip = (row + col) % 2 == 1
    upper = np.where(flip, fx + fy < 1, fx > fy)
    cells = OUTPUT_SIZE // cell
    ids = ((row * cells + col) * 2 + upper).astype(np.intp).ravel()
    count = cells * cells * 2
    jitter = np.random.default_rng(_RNG_SEED).uniform(0.88, 1.12, count).astype(np.float32)
    return ids, jitter, count


@cache
def _palette_image(colours: tuple[tuple[int, int, int], ...]) -> Image.Image:
    palette = Image.new("P", (1, 1))
    flat = [channel for colour in colours for channel in colour]
    palette.putpalette(flat + flat[-3:] * (256 - len(colours)))
    return palette


# ---- styles ----


def _pixel_art(image: Image.Image, prompt: str) -> Image.Image:
    small = ImageOps.autocontrast(image.resize((64, 64), Image.Resampling.BOX), cutoff=1)
    quantized = small.quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return quantized.convert("RGB").resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.NEAREST)


def _anime(image: Image.Image, prompt: str) -> Image.Image:
    flat = _array(_posterize_hsv(_smooth(image, 1.5), value_levels=4, saturation=1.15, value_floor=90))
    # Pastel: lift everything towards white a little, as cel backgrounds are.
    pastel = flat.astype(np.float32) * 0.85 + 38
    pastel[_edge_mask(image, 40)] = (40, 30, 45)
    return _image(pastel)


def _game(image: Image.Image, prompt: str) -> Image.Image:
    graded = ImageOps.autocontrast(_smooth(image, 2.5), cutoff=2)
    flat = _array(_posterize_hsv(graded, value_levels=3, saturation=1.7, value_floor=50)).copy()
    flat[_edge_mask(image, 30, thick=True)] = (10, 10, 20)
    return _image(flat)


# A 5x5 diagonal smear: pixels drag along one direction like a loaded brush.
_BRUSH: Final = ImageFilter.Kernel((5, 5), [float(row == col) for row in range(5) for col in range(5)])


def _mirror_pad(image: Image.Image, pad: int) -> Image.Image:
    """Reflect the border outwards so neighbourhood filters see picture, not black, at the edges."""
    return Image.fromarray(np.pad(_array(image), ((pad, pad), (pad, pad), (0, 0)), mode="reflect"), "RGB")


def _oil(image: Image.Image, prompt: str) -> Image.Image:
    pad = 4
    small = _mirror_pad(image.resize((HALF, HALF), Image.Resampling.BILINEAR), pad)
    smeared = small.filter(ImageFilter.MedianFilter(3)).filter(_BRUSH)
    strokes = _posterize_hsv(smeared, value_levels=10, saturation=1.45, value_floor=20)
    # Brush relief: an embossed copy of the paint, laid over it like light raking across impasto.
    relief_small = strokes.convert("L").filter(ImageFilter.EMBOSS)
    crop = (pad, pad, pad + HALF, pad + HALF)
    paint = strokes.resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.BICUBIC, box=crop)
    relief_image = relief_small.resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.BILINEAR, box=crop)
    relief = _array(relief_image).astype(np.float32) - 128
    warm = np.array([1.06, 1.0, 0.86], dtype=np.float32)
    return _image(np.clip(_array(paint).astype(np.float32) * warm + relief[..., None] * 1.6, 0, 255))


def _clay(image: Image.Image, prompt: str) -> Image.Image:
    soft = _posterize_hsv(_smooth(image, 3.0), value_levels=6, saturation=1.35, value_floor=60)
    colour = _array(soft).astype(np.float32)
    # Thumbprint-soft shading: a blurred emboss gives rounded bumps instead of crisp relief.
    bumps = soft.convert("L").resize((HALF, HALF)).filter(ImageFilter.EMBOSS).filter(ImageFilter.BLUR)
    shade = _array(bumps.resize((OUTPUT_SIZE, OUTPUT_SIZE))).astype(np.float32) - 128
    colour = colour * np.array([1.08, 0.98, 0.9], dtype=np.float32) + shade[..., None] * 1.2
    outline = _edge_mask(image, 45, thick=True)
    colour[outline] *= 0.55
    return _image(np.clip(colour, 0, 255))


def _render_3d(image: Image.Image, prompt: str) -> Image.Image:
    base = _array(_smooth(image, 2.0)).astype(np.float32)
    detail = _array(image).astype(np.float32) - _array(image.filter(ImageFilter.BoxBlur(2))).astype(
        np.float32
    )
    # Smooth, plastic surfaces with a little crisp detail back, an S-curve and teal/orange grading.
    surface = base + detail * 0.35
    x = surface / 255
    curved = x * x * (3 - 2 * x)
    grade = np.where(curved > 0.5, [1.08, 1.0, 0.9], [0.9, 1.0, 1.1]).astype(np.float32)
    lum = curved.mean(axis=2, keepdims=True)
    saturated = lum + (curved - lum) * 1.35
    return _image(np.clip(saturated * grade * _vignette() * 255 + 10, 0, 255))


def _low_poly(image: Image.Image, prompt: str) -> Image.Image:
    ids, jitter, count = _triangles()
    pixels = _array(image).reshape(-1, 3).astype(np.float32)
    sizes = np.bincount(ids, minlength=count).astype(np.float32)
    means = np.stack([np.bincount(ids, pixels[:, c], minlength=count) for c in range(3)], axis=1)
    means = means / sizes[:, None] * jitter[:, None]
    return _image(np.clip(means[ids], 0, 255).reshape(OUTPUT_SIZE, OUTPUT_SIZE, 3))


_UKIYO_E_PALETTE: Final = (
    (28, 36, 58),  # sumi ink
    (38, 70, 112),  # Prussian blue
    (96, 134, 160),  # pale indigo
    (168, 196, 200),  # sky
    (236, 226, 200),  # paper
    (196, 84, 56),  # vermilion
    (208, 160, 90),  # ochre
    (120, 136, 96),  # sage
)


def _ukiyo_e(image: Image.Image, prompt: str) -> Image.Image:
    flat = ImageOps.autocontrast(_smooth(image, 1.5), cutoff=2)
    printed = flat.quantize(palette=_palette_image(_UKIYO_E_PALETTE), dither=Image.Dither.NONE)
    colour = _array(printed.convert("RGB")).astype(np.float32) + _paper_texture()
    colour[_edge_mask(image, 35)] = _UKIYO_E_PALETTE[0]
    return _image(np.clip(colour, 0, 255))


def _neon(image: Image.Image, prompt: str) -> Image.Image:
    gray = image.convert("L").resize((HALF, HALF), Image.Resampling.BILINEAR).filter(ImageFilter.SMOOTH)
    edges = ImageOps.autocontrast(_find_edges(gray), cutoff=1)
    glow = edges.filter(ImageFilter.GaussianBlur(4))
    lines = np.asarray(edges.resize((OUTPUT_SIZE, OUTPUT_SIZE)), dtype=np.float32)[..., None] / 255
    halo = np.asarray(glow.resize((OUTPUT_SIZE, OUTPUT_SIZE)), dtype=np.float32)[..., None] / 255
    night = _array(image).astype(np.float32) * np.array([0.12, 0.1, 0.22], dtype=np.float32)
    light = _neon_gradient() * np.clip(lines * 1.6 + halo * 1.8, 0, 1.2)
    return _image(np.clip(night + light + lines * 90, 0, 255))


def _sketch(image: Image.Image, prompt: str) -> Image.Image:
    gray = _array(image.convert("L")).astype(np.float32)
    blurred = _array(ImageOps.invert(image.convert("L")).filter(ImageFilter.GaussianBlur(6))).astype(
        np.float32
    )
    dodge = np.clip(gray * 255 / np.maximum(255 - blurred, 1), 0, 255)  # colour dodge: pencil on paper
    paper = np.array([246, 242, 232], dtype=np.float32) / 255
    return _image(dodge[..., None] * paper + _paper_texture() * 0.4)


def _sepia(image: Image.Image, prompt: str) -> Image.Image:
    gray = ImageOps.autocontrast(image.convert("L"), cutoff=1)
    toned = _array(ImageOps.colorize(gray, black=(38, 24, 12), mid=(160, 118, 80), white=(250, 236, 205)))
    return _image(np.clip(toned.astype(np.float32) * _vignette() + _paper_texture() * 0.8, 0, 255))


def _duotone_colours(prompt: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    words = [word.strip(".,;:!?") for word in prompt.lower().split()]
    named = [_COLOUR_WORDS[word] for word in words if word in _COLOUR_WORDS]
    if len(named) >= 2:
        dark, light = sorted(named[:2], key=sum)
        return dark, light
    pair = _DUOTONE_PAIRS[zlib.crc32(prompt.strip().lower().encode()) % len(_DUOTONE_PAIRS)]
    if named:  # one colour word: it becomes the highlight colour over the pair's shadow colour
        return pair[0], named[0]
    return pair


def _duotone(image: Image.Image, prompt: str) -> Image.Image:
    dark, light = _duotone_colours(prompt)
    gray = ImageOps.posterize(ImageOps.autocontrast(_smooth(image, 1.0).convert("L"), cutoff=2), 3)
    poster = _array(ImageOps.colorize(gray, black=dark, white=light)).copy()
    poster[_edge_mask(image, 45)] = dark
    return _image(poster)


STYLES: Final[dict[str, Filter]] = {
    "pixel_art": _pixel_art,
    "anime": _anime,
    "game": _game,
    "oil": _oil,
    "clay": _clay,
    "render_3d": _render_3d,
    "low_poly": _low_poly,
    "ukiyo_e": _ukiyo_e,
    "neon": _neon,
    "sketch": _sketch,
    "sepia": _sepia,
    "duotone": _duotone,
}


@cache
def _badge() -> Image.Image:
    font = ImageFont.load_default(size=14)
    label = "PREVIEW · not AI"
    left, top, right, bottom = font.getbbox(label)
    badge = Image.new("RGBA", (right - left + 12, bottom - top + 8), (0, 0, 0, 150))
    ImageDraw.Draw(badge).text((6 - left, 4 - top), label, font=font, fill=(255, 255, 255, 235))
    return badge


class PreviewEngine:
    name = "preview"
    model = "Preview filters (not AI)"
    preview = True
    modes = (
        RenderMode(
            id="preview",
            label="Preview",
            approximate=False,
            detail="Classical filters on the CPU standing in for FLUX.2; no model runs.",
        ),
    )

    def __init__(
        self,
        *,
        max_batch: int = 8,
        delay_seconds: float = 0.0,
        warmup_seconds: float = 0.0,
        adapters: Sequence[AdapterInfo] = (),
    ) -> None:
        self.max_batch = max_batch
        self.adapters = tuple(adapters)
        self._adapter_defaults = {info.name: info.scale for info in self.adapters}
        self.delay_seconds = delay_seconds
        self._warm = False
        self.warmup_seconds = warmup_seconds

    def warm_up(self) -> None:
        # Like a model's load, the simulated one happens once: warming a warm engine (Modal's enter hook
        # warms it, then the worker's render loop asks again) costs nothing.
        if self._warm:
            return
        self._warm = True
        if self.warmup_seconds:
            time.sleep(self.warmup_seconds)
        # Build the cached tables now, so the first frame of any style is as fast as every other one.
        for cached in (_vignette, _paper_texture, _neon_gradient, _triangles, _badge):
            cached()
        self.render_one(encode_jpeg(Image.new("RGB", (OUTPUT_SIZE, OUTPUT_SIZE), (128, 128, 128))), "")

    def render(self, jobs: Sequence[FrameJob]) -> list[bytes]:
        if len(jobs) > self.max_batch:
            raise ValueError(f"batch of {len(jobs)} exceeds max_batch {self.max_batch}")
        for job in jobs:
            if job.mode not in ("", "preview"):
                raise ValueError(f"unknown mode {job.mode!r}; the preview engine has only 'preview'")
            if job.adapter is not None and job.adapter not in self._adapter_defaults:
                raise ValueError(f"unknown adapter {job.adapter!r}")
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        return [
            self.render_one(job.jpeg, job.prompt, job.style, job.adapter, self._scale(job)) for job in jobs
        ]

    def _scale(self, job: FrameJob) -> float:
        if job.adapter is None:
            return 0.0
        return job.adapter_scale if job.adapter_scale is not None else self._adapter_defaults[job.adapter]

    def render_one(
        self,
        jpeg: bytes,
        prompt: str,
        style: StyleImage | None = None,
        adapter: str | None = None,
        adapter_scale: float = 0.0,
    ) -> bytes:
        styled = STYLES[style_for_prompt(prompt)](decode_square(jpeg), prompt)
        if style is not None:
            styled = transfer_palette(styled, style)
        if adapter is not None and adapter_scale > 0:
            styled = adapter_cast(styled, adapter, adapter_scale)
        badge = _badge()
        styled.paste(badge, (OUTPUT_SIZE - badge.width - 8, OUTPUT_SIZE - badge.height - 8), badge)
        return encode_jpeg(styled)


def transfer_palette(image: Image.Image, style: StyleImage, strength: float = 0.85) -> Image.Image:
    """``image`` recoloured towards ``style``'s palette: each channel's mean and spread moved to the style
    image's (a colour transfer in RGB), ``strength`` of the way."""
    source = _array(image).astype(np.float32)
    target = style.pixels.reshape(-1, 3).astype(np.float32)
    mean, std = source.reshape(-1, 3).mean(axis=0), source.reshape(-1, 3).std(axis=0) + 1.0
    transferred = (source - mean) / std * (target.std(axis=0) + 1.0) + target.mean(axis=0)
    return _image(np.clip(source + strength * (transferred - source), 0, 255).astype(np.uint8))


def adapter_colour(name: str) -> tuple[int, int, int]:
    """The preview's stand-in colour for adapter ``name``: saturated, and the same on every worker."""
    hue = zlib.crc32(name.encode()) % 256
    swatch = Image.new("HSV", (1, 1), (hue, 230, 235)).convert("RGB")
    red, green, blue = swatch.getpixel((0, 0))  # type: ignore[misc]
    return int(red), int(green), int(blue)


def adapter_cast(image: Image.Image, adapter: str, scale: float) -> Image.Image:
    """``image`` multiplied by the adapter's colour, ``scale / MAX_ADAPTER_SCALE`` of the way: the
    strength slider visibly moves it, from no cast at 0 to a full one at the maximum."""
    source = _array(image).astype(np.float32)
    tinted = source * (np.array(adapter_colour(adapter), dtype=np.float32) / 255)
    mix = min(max(scale / MAX_ADAPTER_SCALE, 0.0), 1.0)
    return _image(np.clip(source + mix * (tinted - source), 0, 255))


def create_preview_engine(config: WorkerConfig) -> PreviewEngine:
    return PreviewEngine(
        max_batch=config.max_batch,
        delay_seconds=config.preview_delay_seconds,
        warmup_seconds=config.preview_warmup_seconds,
        adapters=[spec.info() for spec in config.adapter_specs],
    )
