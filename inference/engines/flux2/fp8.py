"""FP8 linear layers: the transformer blocks' matrix products on FP8 (e4m3) tensor cores.

The modes with ``ModeRecipe.fp8`` run on a quantized copy of the transformer, so the bf16 one stays exact
for the modes that are. Only the blocks are quantized: they hold nearly all of the FLOPs, with thousands
of tokens per product; the input and output projections and the timestep/modulation layers (one row per
image) stay in bf16.
"""

from __future__ import annotations

import copy
from typing import Final

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

FLOAT8: Final = torch.float8_e4m3fn
FLOAT8_MAX: Final = torch.finfo(FLOAT8).max


class Float8Linear(torch.nn.Module):
    """A bias-free or biased ``nn.Linear`` computed in FP8: ``x @ W.T (+ b)`` with W stored as e4m3 with one
    float32 scale per output channel, and x quantized per row (token) at each call. ``torch._scaled_mm``
    multiplies the FP8 operands (fast accumulation) and applies both scales to the accumulator."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_fp8, weight_scale = _quantize_weight(linear.weight.detach())
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)  # (1, out_features)
        self.bias = linear.bias

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (out_features, in_features) into this layer's own buffers, in place: a
        compiled graph or a captured CUDA graph reading them computes with the new weight from then on."""
        weight_fp8, weight_scale = _quantize_weight(weight)
        self.weight_fp8.copy_(weight_fp8)
        self.weight_scale.copy_(weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = (rows.abs().amax(dim=1, keepdim=True).to(torch.float32) / FLOAT8_MAX).clamp(min=1e-12)
        quantized = (rows.to(torch.float32) / scale).to(FLOAT8)
        # _scaled_mm wants the second operand column-major: the transpose of the row-major weight is.
        # Fast accumulation: Hopper's FP8 tensor cores accumulate in reduced precision between the
        # float32 promotions, which makes the products faster (docs/performance.md); the modes that
        # multiply in FP8 are approximate already, and the bench reports their deviation with it.
        out = torch._scaled_mm(
            quantized,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=x.dtype,
            use_fast_accum=True,
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, (1, out_features) float32 scales): one scale per output channel."""
    weight = weight.to(torch.float32)
    scale = (weight.abs().amax(dim=1, keepdim=True) / FLOAT8_MAX).clamp(min=1e-12)
    return (weight / scale).to(FLOAT8), scale.t().contiguous()


def quantize_transformer_fp8(transformer: torch.nn.Module) -> int:
    """Replace the linear layers inside the transformer blocks by Float8Linear, in place; returns how many."""
    replaced = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                # FP8 matrix products need both dimensions divisible by 16.
                if (
                    isinstance(child, torch.nn.Linear)
                    and child.in_features % 16 == child.out_features % 16 == 0
                ):
                    parent._modules[name] = Float8Linear(child)
                    replaced += 1
    return replaced


def quantized_copy(transformer: Flux2Transformer2DModel) -> Flux2Transformer2DModel:
    """A copy of ``transformer`` sharing nothing with it, its blocks in FP8. It costs half the bf16
    transformer's memory again (~4 GB at klein-4B size)."""
    quantized = copy.deepcopy(transformer)
    # One product for q, k and v of each stream of the double blocks instead of three: the text stream's
    # products are only 128 rows, where FP8 kernels are mostly launch and tail.
    quantized.fuse_qkv_projections()
    quantize_transformer_fp8(quantized)
    return quantized
