"""Frames per second of the preview engine, per style, on the calling thread:

    uv run python -m bench.preview [photo.jpg] [--frames 40]

Pin it to one core (`taskset -c 0`) to check the one-core budget. Reports wall time and the thread's CPU
time (the latter is what matters on a machine shared with other work).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from inference.engines.preview import STYLES, PreviewEngine, style_for_prompt


def synthetic_webcam_frame(width: int = 640, height: int = 480) -> bytes:
    """A 640x480 head-and-shoulders scene with gradients, edges and sensor noise, as JPEG."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack(
        [x / width * 200 + 30, y / height * 160 + 40, (x + y) / (width + height) * 120 + 80], -1
    )
    image = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    cx, cy, r = width // 2, height // 2, min(width, height) // 4
    draw.ellipse((cx - r, cy - r * 1.2, cx + r, cy + r), fill=(224, 182, 150))
    draw.rectangle((cx - r * 1.5, cy + r, cx + r * 1.5, height), fill=(40, 70, 160))
    noise = np.random.default_rng(0).normal(0, 5, (height, width, 3))
    noisy = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(0.8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.preview",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "photo", nargs="?", type=Path, help="a JPEG to style (default: a synthetic 640x480 frame)"
    )
    parser.add_argument("--frames", type=int, default=40, help="frames per style (default 40)")
    args = parser.parse_args(argv)

    jpeg = args.photo.read_bytes() if args.photo else synthetic_webcam_frame()
    engine = PreviewEngine()
    engine.warm_up()
    print(f"{'style':<10} {'wall fps':>9} {'cpu fps':>8} {'cpu ms p50':>11} {'cpu ms max':>11}")
    slowest = float("inf")
    for style in sorted(STYLES):
        prompt = style.replace("_", " ")
        assert style_for_prompt(prompt) == style
        cpu: list[float] = []
        started = time.perf_counter()
        for _ in range(args.frames):
            before = time.thread_time()
            engine.render_one(jpeg, prompt)
            cpu.append(time.thread_time() - before)
        wall_fps = args.frames / (time.perf_counter() - started)
        cpu_fps = 1 / statistics.mean(cpu)
        slowest = min(slowest, cpu_fps)
        median, worst = statistics.median(cpu) * 1000, max(cpu) * 1000
        print(f"{style:<10} {wall_fps:>9.1f} {cpu_fps:>8.1f} {median:>11.1f} {worst:>11.1f}")
    print(f"slowest style: {slowest:.1f} fps of CPU time on one core")


if __name__ == "__main__":
    main()
