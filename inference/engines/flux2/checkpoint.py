"""Where the engine's pipeline comes from: a diffusers-format checkpoint (a local folder, or downloaded
from the Hugging Face Hub), or the klein architecture built with random weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import torch
from diffusers import Flux2KleinPipeline

from inference.engines.flux2.config import Flux2Config
from inference.engines.flux2.klein_config import KLEIN_4B, TINY, build_random_components

logger = logging.getLogger(__name__)

# Only the diffusers-format folders: the repo also carries single-file checkpoints we never read.
CHECKPOINT_PATTERNS: Final = (
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "tokenizer/*",
    "transformer/*",
    "vae/*",
)


def build_pipeline(config: Flux2Config, device: torch.device, dtype: torch.dtype) -> Flux2KleinPipeline:
    """The pipeline ``config`` names, on ``device`` in ``dtype``."""
    if config.tiny or config.random_weights:
        architecture = TINY if config.tiny else KLEIN_4B
        logger.info("building %s with random weights on %s (%s)", architecture.name, device, dtype)
        components = build_random_components(
            architecture, device=device, dtype=dtype, seed=config.weights_seed
        )
        return Flux2KleinPipeline(**components, is_distilled=True)
    path = download_checkpoint(
        config.model,
        cache_dir=config.cache_dir,
        revision=config.revision,
        local_files_only=config.local_files_only,
    )
    if device.type == "cuda":
        # Read straight into device memory: loaded plainly, every weight is first materialised in host memory
        # and then copied again by .to(), and how long that takes varies with the host's free memory.
        with torch.cuda.device(device):
            return Flux2KleinPipeline.from_pretrained(
                path, torch_dtype=dtype, is_distilled=True, device_map="cuda"
            )
    pipe = Flux2KleinPipeline.from_pretrained(path, torch_dtype=dtype, is_distilled=True)
    return pipe.to(device)


def download_checkpoint(
    model: str,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local directory of ``model``: itself if it is a directory, else a snapshot of the Hub repo,
    downloaded into ``cache_dir`` with huggingface_hub's progress bars (files already there are reused)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    # A worker's first start downloads ~16 GB; the progress bars are the only sign it is not stuck.
    enable_progress_bars()
    logger.info("fetching %s (revision %s) into %s", model, revision or "main", cache_dir or "the HF cache")
    path = snapshot_download(
        model,
        revision=revision,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        allow_patterns=list(CHECKPOINT_PATTERNS),
        local_files_only=local_files_only,
    )
    logger.info("%s is at %s", model, path)
    return Path(path)
