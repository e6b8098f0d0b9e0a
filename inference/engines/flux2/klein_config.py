"""FLUX.2 [klein] 4B architecture, and building its diffusers components without downloading anything.

Two configurations:

* ``KLEIN_4B``: the published klein-4B architecture (transformer, VAE, Qwen3-4B text encoder, scheduler).
  With random weights it has the real parameter count, memory footprint and FLOPs, so GPU benchmarks of it
  time the same kernels the real checkpoint runs; the pixels it produces are noise.
* ``TINY``: the same component classes shrunk until the real pipeline code runs on a CPU in well under a
  second per frame. Tests use it; it keeps every structural property the engine relies on (512² output,
  2x2 latent patches, a 512-token padded prompt, hidden states of text-encoder layers 9/18/27).

Neither needs the network: the tokenizer is a byte-level BPE built here with the ``tokenizers`` library
(through transformers' Qwen2 tokenizer class, as the real checkpoint uses) and a Qwen3-style chat template.
It tokenizes text differently from the real Qwen tokenizer, which does not matter for random weights: the
pipeline pads every prompt to 512 tokens, so the text encoder's cost does not depend on the words.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from tokenizers import AddedToken, pre_tokenizers
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

# The hidden states Flux2KleinPipeline stacks into a prompt embedding (index 0 is the embedding output).
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
# Flux2KleinPipeline pads (and truncates) every prompt to this many tokens.
MAX_SEQUENCE_LENGTH = 512

# Qwen3's chat template reduced to what Flux2KleinPipeline uses: one user turn, the assistant header, and
# the empty thinking block that ``enable_thinking=False`` inserts.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


@dataclass(frozen=True)
class KleinConfig:
    """Constructor arguments of each Flux2KleinPipeline component."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(
        default_factory=lambda: {
            # FLUX.2's scheduler: resolution-dependent exponential time shift; the pipeline passes ``mu``.
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": True,
            "base_shift": 0.5,
            "max_shift": 1.15,
            "base_image_seq_len": 256,
            "max_image_seq_len": 4096,
            "time_shift_type": "exponential",
        }
    )


KLEIN_4B = KleinConfig(
    name="klein-4B",
    transformer={
        "patch_size": 1,
        "in_channels": 128,  # 32 VAE latent channels x 2x2 patch
        "num_layers": 5,
        "num_single_layers": 20,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 7680,  # 3 stacked Qwen3-4B hidden states of 2560
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": (32, 32, 32, 32),
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": False,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 32,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "batch_norm_eps": 1e-4,
        "batch_norm_momentum": 0.1,
        "patch_size": (2, 2),
    },
    text_encoder={
        # Qwen3-4B
        "vocab_size": 151936,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
)

TINY = KleinConfig(
    name="tiny",
    transformer={
        "patch_size": 1,
        "in_channels": 16,  # 4 latent channels x 2x2 patch
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 48,  # 3 stacked hidden states of 16
        "timestep_guidance_channels": 32,
        "mlp_ratio": 2.0,
        "axes_dims_rope": (4, 4, 4, 4),
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": False,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        # Four blocks keep the 8x VAE downsampling, so 512² frames still give 32x32 patched latents
        # (1024 image tokens), as in the real model.
        "block_out_channels": (4, 8, 8, 8),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 64,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "batch_norm_eps": 1e-4,
        "batch_norm_momentum": 0.1,
        "patch_size": (2, 2),
    },
    text_encoder={
        "vocab_size": 300,  # 256 byte-level symbols + special tokens, rounded up
        "hidden_size": 16,
        "intermediate_size": 32,
        # One more layer than the deepest hidden state used (27), so that state is an intermediate one
        # and not the final-norm output, as in the 36-layer model.
        "num_hidden_layers": 28,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
)

CONFIGS = {KLEIN_4B.name: KLEIN_4B, TINY.name: TINY}


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template, built offline.

    Every byte maps to one token (no merges), so any text tokenizes; ids stay below 300, which fits both
    the tiny and the real vocabulary.
    """
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    end_of_text, _, end_of_turn, *_ = SPECIAL_TOKENS
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=end_of_text,
        eos_token=end_of_turn,
        pad_token=end_of_text,  # Qwen pads with <|endoftext|>
        model_max_length=131072,
    )
    # Registered as special tokens so the chat markers are matched whole, never split into bytes.
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


@contextlib.contextmanager
def _default_device_and_dtype(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    # Initialising 8B parameters on the CPU takes minutes; created directly on the GPU in the target dtype
    # it takes seconds and never needs a float32 copy of the weights.
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous_dtype)


def build_random_components(
    config: KleinConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Flux2KleinPipeline's components (``Flux2KleinPipeline(**components, is_distilled=True)``) with
    random weights drawn from ``seed``: the same seed gives the same weights on the same device."""
    device = torch.device(device)
    torch.manual_seed(seed)
    with _default_device_and_dtype(device, dtype):
        transformer = Flux2Transformer2DModel(**config.transformer)
        vae = AutoencoderKLFlux2(**config.vae)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**config.text_encoder))
    # A fresh BatchNorm has mean 0 / variance 1, which would make the latent normalisation a no-op; give it
    # the kind of statistics a trained VAE has so that code path does real arithmetic.
    with torch.no_grad():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
        vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    for module in (transformer, vae, text_encoder):
        module.to(device=device).eval().requires_grad_(False)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": build_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**config.scheduler),
    }
