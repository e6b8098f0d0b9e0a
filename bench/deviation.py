"""How far an image is from its reference: the figure every approximate mode and gate reports."""

from __future__ import annotations

import math

import torch


def deviation(image: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, PSNR in dB) of two float images in [0, 1]."""
    diff = image.float().cpu() - reference.float().cpu()
    mse = float(diff.pow(2).mean())
    return float(diff.abs().max()), (math.inf if mse == 0 else 10 * math.log10(1.0 / mse))
