"""A session's style image as FLUX.2 [klein] reads it: a second reference image after the webcam frame.

``Flux2KleinPipeline(image=[frame, style])`` VAE-encodes each reference image on its own, packs each to
tokens and appends them after the noise tokens in the order given; their position ids differ in the time
coordinate only (``_prepare_image_ids``: 10 for the first image, 20 for the second). The engine does the
same, except that the style image does not change between a session's frames: its latent tokens are
encoded once, on the first frame that carries it, and kept for as long as the session holds that
``StyleImage`` (a weak key: the entry goes with the session's image). Under a recipe's ``style_kv_once``
its reference keys and values are kept the same way (``StyleKV``), per way of computing them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence

import torch
from diffusers import Flux2KleinPipeline

from inference.engines.flux2.cuda_graphs import batch_rows
from inference.style_image import StyleImage

# Encodes uint8 RGB images (B, 3, S, S) at size² as packed reference latents (B, tokens, C).
EncodeReference = Callable[[torch.Tensor, int], torch.Tensor]


def style_reference_ids(
    frame_side: int, style_side: int, channels: int, device: torch.device
) -> torch.Tensor:
    """Position ids (1, style tokens, 4) of a style image whose packed latent is ``style_side`` tokens a
    side, after a frame of ``frame_side``: the ids Flux2KleinPipeline gives the second of two reference
    images."""
    frame = torch.empty((1, channels, frame_side, frame_side), device="meta")
    style = torch.empty((1, channels, style_side, style_side), device="meta")
    ids = Flux2KleinPipeline._prepare_image_ids([frame, style])
    return ids[:, frame_side * frame_side :].to(device)


class StyleLatents:
    """The encoded style images of one engine, by (StyleImage, size): each encoded once."""

    def __init__(self, encode: EncodeReference, device: torch.device) -> None:
        self._encode = encode
        self._device = device
        self._latents: weakref.WeakKeyDictionary[StyleImage, dict[int, torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )
        self.encoded = 0  # how many encodings have run (a test and the bench read it)

    def __len__(self) -> int:
        return len(self._latents)

    def latents(self, style: StyleImage, size: int) -> torch.Tensor:
        """(1, tokens, C) reference latents of ``style`` read at size², encoded on first use."""
        by_size = self._latents.setdefault(style, {})
        latents = by_size.get(size)
        if latents is None:
            pixels = torch.from_numpy(style.pixels.copy()).permute(2, 0, 1)[None].to(self._device)
            latents = self._encode(pixels, size)
            by_size[size] = latents
            self.encoded += 1
        return latents

    def batch(self, styles: Sequence[StyleImage], size: int) -> torch.Tensor:
        """(B, tokens, C): one row per job, in order."""
        return batch_rows([self.latents(style, size) for style in styles])


class StyleKV:
    """The style images' reference keys and values (kv_reuse.stack_kv's form, one batch row each) of one
    engine, by (StyleImage, key): the key names everything else they depend on (the transformer copy, the
    size the image is read at, the row's LoRA adapter and scale). Each is computed once; 25 layers of
    keys and values of 1,024 tokens are ~300 MB of device memory, held while the session holds its
    image."""

    def __init__(self) -> None:
        self._kv: weakref.WeakKeyDictionary[StyleImage, dict[Hashable, torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )
        self.computed = 0  # how many batches were computed (a test and the bench read it)

    def __len__(self) -> int:
        return len(self._kv)

    def batch(
        self, styles: Sequence[StyleImage], keys: Sequence[Hashable], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """(layers, 2, B, tokens, heads, head_dim) for the rows' ``styles`` under their ``keys``. When a row
        has none yet, ``compute()`` makes the whole batch's (rows are independent) and each row is kept."""
        found = [self._kv.get(style, {}).get(key) for style, key in zip(styles, keys, strict=True)]
        if any(kv is None for kv in found):
            stacked = compute()
            self.computed += 1
            # Each row its own copy, so a kept row does not hold the whole batch's memory.
            found = [stacked] if len(styles) == 1 else [row.clone() for row in stacked.split(1, dim=2)]
            for style, key, kv in zip(styles, keys, found, strict=True):
                self._kv.setdefault(style, {})[key] = kv
        return batch_rows(found, dim=2)  # type: ignore[arg-type]
