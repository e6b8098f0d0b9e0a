"""Prompt embeddings: what ``Flux2KleinPipeline`` computes from a prompt, through only the part of its
Qwen3 text encoder that the embedding reads, and on CUDA replayed from one captured graph.

The embedding stacks the hidden states 9, 18 and 27 (``TEXT_ENCODER_OUT_LAYERS``) of a 36-layer model. The
layers past them and the language-model head (which scores 151,936 tokens at each of the 512 positions)
change none of those states, so the engine drops the layers and runs the decoder without the head: the
same embedding, bit for bit, from about half the time, and 1.6 GB less memory in bf16.

Launched from Python, the decoder's ~600 short kernels keep a new prompt GPU-bound by launches, and twice
as slow again when the worker's event loop wants the interpreter meanwhile. Every prompt is padded to the
same 512 tokens, so one captured graph serves them all (docs/performance.md, "A new prompt").
"""

from __future__ import annotations

from typing import Any

import torch

from inference.engines.flux2.cuda_graphs import FrameGraph
from inference.engines.flux2.klein_config import MAX_SEQUENCE_LENGTH, TEXT_ENCODER_OUT_LAYERS

# The hidden state of index k is the output of layer k - 1, except the last one a model returns, which
# comes after its final norm. One layer past the deepest state read keeps that state an intermediate one.
TEXT_ENCODER_LAYERS = max(TEXT_ENCODER_OUT_LAYERS) + 1


def keep_embedding_layers(text_encoder: Any) -> None:
    """Drop the decoder layers of ``text_encoder`` (a ``Qwen3ForCausalLM``) past ``TEXT_ENCODER_LAYERS``;
    a model that has no more than those is left as it is."""
    decoder, config = text_encoder.model, text_encoder.config
    if len(decoder.layers) <= TEXT_ENCODER_LAYERS:
        return
    del decoder.layers[TEXT_ENCODER_LAYERS:]
    config.num_hidden_layers = TEXT_ENCODER_LAYERS
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:TEXT_ENCODER_LAYERS]


class PromptEncoder:
    """A prompt's (1, 512, joint_attention_dim) embedding as ``Flux2KleinPipeline._get_qwen3_prompt_embeds``
    computes it (its tokenisation and stacking), from the decoder of ``text_encoder`` without its head;
    ``text_encoder`` is cut to the layers that embedding reads (``keep_embedding_layers``). With ``graph``
    (CUDA), a padded prompt's pass is one replayed graph, captured on the first one."""

    def __init__(self, text_encoder: Any, tokenizer: Any, device: torch.device, *, graph: bool) -> None:
        keep_embedding_layers(text_encoder)
        self.decoder = text_encoder.model
        self.tokenizer = tokenizer
        self.device = device
        self.graph = graph
        self._captured: FrameGraph | None = None

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        input_ids, attention_mask = self.tokens(prompt)
        # A prompt of 512 tokens or more pads nothing: the decoder then attends by SDPA's causal flag
        # rather than a mask, a kernel a captured pass (which always builds the mask) would not run.
        padded = not bool(attention_mask.all())
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if not (self.graph and padded):
            return self.eager(input_ids, attention_mask)
        if self._captured is None:
            self._captured = FrameGraph(self.eager, (input_ids, attention_mask), pool=None)
        return self._captured(input_ids, attention_mask)

    def tokens(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) of ``prompt``, on the CPU: one user turn of the chat template without
        thinking, padded and truncated to MAX_SEQUENCE_LENGTH, as the pipeline tokenises it."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        inputs = self.tokenizer(
            text, return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_SEQUENCE_LENGTH
        )
        return inputs["input_ids"], inputs["attention_mask"]

    def eager(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's pass launched kernel by kernel, and the chosen hidden states side by side."""
        output = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        states = torch.stack([output.hidden_states[k] for k in TEXT_ENCODER_OUT_LAYERS], dim=1)
        batch, layers, tokens, width = states.shape
        return states.permute(0, 2, 1, 3).reshape(batch, tokens, layers * width)
