"""The last single block computed for the rows a step's prediction reads.

A step's prediction is the noise tokens' rows of the transformer's output. Every block but the last feeds
all rows forward (the next block attends to them all); the last single block's output rows other than the
noise tokens' (the prompt's and the reference images') are dropped right after it. So that block needs
every row's keys and values, but queries, the MLP and the output projection only for the noise rows: at
512² with the full prompt, 1,024 of 2,560 rows, ~0.37 TFLOP of a step's ~17.7. The noise rows get the
same arithmetic as in the full block (products over fewer rows, a rounding-level difference as
compilation's); the other rows leave the block as they entered it, and nothing reads them.

``predict`` (transformer.py) says which rows those are around each call (``computing_rows``): the prompt's
tokens come first in the joint sequence, then the noise tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
)

from inference.engines.flux2.lora import MultiLoraLinear


class NoiseRowsAttnProcessor(Flux2ParallelSelfAttnProcessor):
    """The single block's attention and MLP for rows ``rows`` = (start, stop) only, its output zero on the
    other rows (the block then adds nothing to them); with ``rows`` None, the full block's."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: tuple[int, int] | None = None

    def __call__(
        self,
        attn: Flux2ParallelSelfAttention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        linear = _plain_linear(attn.to_qkv_mlp_proj)
        if self.rows is None or linear is None or attention_mask is not None:
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
        start, stop = self.rows
        inner = attn.inner_dim
        weight, bias = linear.weight, linear.bias

        def project(x: torch.Tensor, first: int, last: int | None) -> torch.Tensor:
            return F.linear(x, weight[first:last], None if bias is None else bias[first:last])

        rows = hidden_states[:, start:stop]
        query = project(rows, 0, inner)  # the rows' queries, every row's keys and values, the rows' MLP
        key, value = project(hidden_states, inner, 3 * inner).chunk(2, dim=-1)
        mlp_hidden_states = project(rows, 3 * inner, None)

        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query = apply_rotary_emb(query, (cos[start:stop], sin[start:stop]), sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        attn_output = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        attn_output = attn_output.flatten(2, 3).to(query.dtype)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        output = attn.to_out(torch.cat([attn_output, mlp_hidden_states], dim=-1))
        return F.pad(output, (0, 0, start, hidden_states.shape[1] - stop))


def _plain_linear(layer: torch.nn.Module) -> torch.nn.Linear | None:
    """The ``nn.Linear`` whose weight computes ``layer``'s output, or None where its output is more than
    that (LoRA branches per row, an FP8 layer): the processor then runs the full block."""
    if isinstance(layer, MultiLoraLinear):
        if layer.selection.branches:
            return None
        layer = layer.base  # the batch's one adapter, if any, is fused into its weight
    return layer if type(layer) is torch.nn.Linear else None


def use_noise_rows_attention(transformer: Flux2Transformer2DModel) -> bool:
    """Give the transformer's last single block a NoiseRowsAttnProcessor when it has the default one (a
    block with the reference K/V processors keeps them); whether it now has one."""
    attn = transformer.single_transformer_blocks[-1].attn
    if type(attn.processor) is Flux2ParallelSelfAttnProcessor:
        attn.set_processor(NoiseRowsAttnProcessor())
    return isinstance(attn.processor, NoiseRowsAttnProcessor)


@contextmanager
def computing_rows(transformer: torch.nn.Module, start: int, stop: int) -> Iterator[None]:
    """Within the block, calls of ``transformer`` (or of a compiled wrapper of it) are read only at rows
    ``start:stop`` of its joint sequence; if its last single block computes only those, it does so there
    and the full block again after (other callers, such as the pipeline, see the full output)."""
    module = getattr(transformer, "_orig_mod", transformer)
    processor = (
        module.single_transformer_blocks[-1].attn.processor
        if isinstance(module, Flux2Transformer2DModel)
        else None
    )
    if not isinstance(processor, NoiseRowsAttnProcessor):
        yield
        return
    processor.rows = (start, stop)
    try:
        yield
    finally:
        processor.rows = None
