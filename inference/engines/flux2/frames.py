"""Frames in and out of the engine: JPEG bytes to uint8 tensors on the device and back.

Frames stay tensors end to end where they can: on CUDA with torchvision installed, JPEGs are decoded and
encoded by nvJPEG on the GPU (``torchvision.io``); otherwise Pillow does it in the calling thread. A frame
that is not square is center-cropped, and one that is not OUTPUT_SIZE² resized (bilinear, antialiased)
on the device.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from inference.protocol import OUTPUT_SIZE

try:  # nvJPEG decode/encode on the GPU; the CPU-only install has no torchvision and uses Pillow.
    import torchvision.io as tvio
except ImportError:  # pragma: no cover - depends on the install
    tvio = None


def decode_jpegs(jpegs: Sequence[bytes], device: torch.device) -> torch.Tensor:
    """uint8 RGB frames (B, 3, OUTPUT_SIZE, OUTPUT_SIZE) on ``device``."""
    if tvio is not None and device.type == "cuda":
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        decoded = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device)
    else:
        decoded = []
        for jpeg in jpegs:
            with Image.open(io.BytesIO(jpeg)) as image:
                array = np.array(image.convert("RGB"))  # a writable copy for torch
            decoded.append(torch.from_numpy(array).permute(2, 0, 1).to(device))
    return torch.stack([center_square(frame) for frame in decoded])


def encode_jpegs(images: torch.Tensor, quality: int) -> list[bytes]:
    """JPEG bytes of float images in [0, 1] (B, 3, H, W), rounded to 8 bits as diffusers' PIL output."""
    pixels = (images.nan_to_num(0.0) * 255).round().clamp(0, 255).to(torch.uint8)
    if tvio is not None and pixels.device.type == "cuda":
        encoded = tvio.encode_jpeg(list(pixels), quality=quality)
        return [bytes(data.cpu().numpy()) for data in encoded]
    out = []
    for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def center_square(frame: torch.Tensor) -> torch.Tensor:
    """Center-crop a uint8 (3, H, W) frame to a square and resize it to OUTPUT_SIZE² on its device."""
    _, height, width = frame.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frame = frame[:, top : top + side, left : left + side]
    if side == OUTPUT_SIZE:
        return frame
    return resize(frame[None], OUTPUT_SIZE)[0]


def resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) frames resized to size² (bilinear, antialiased), on their device."""
    resized = F.interpolate(frames.to(torch.float32), size=(size, size), mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def gradient_frame(device: torch.device) -> torch.Tensor:
    """A smooth synthetic uint8 frame (1, 3, OUTPUT_SIZE, OUTPUT_SIZE) for warm-up renders."""
    ramp = torch.linspace(0, 255, OUTPUT_SIZE, device=device)
    red = ramp.view(1, -1).expand(OUTPUT_SIZE, -1)
    green = ramp.view(-1, 1).expand(-1, OUTPUT_SIZE)
    blue = torch.full_like(red, 128.0)
    return torch.stack([red, green, blue]).round().to(torch.uint8)[None]
