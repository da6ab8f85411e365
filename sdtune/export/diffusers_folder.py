"""A model as a diffusers folder (``save_pretrained``), for diffusers users."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler

import sdtune
from sdtune import atomic

MARKER = "sdtune.json"  # says the folder is sdtune's, so `export --overwrite` may replace it


def save_diffusers_folder(
    out: Path, unet, vae, text_encoder, tokenizer, scheduler_config: dict, dtype: torch.dtype = torch.float16
) -> Path:
    """Write the components as a StableDiffusionPipeline folder, weights in ``dtype``.

    The inference scheduler is DDIM with the training's prediction type and terminal
    SNR (``scheduler_config``). The folder appears whole or not at all.
    """
    from diffusers import StableDiffusionPipeline  # pulls in image processors; only needed here

    # Copies, so the caller's models keep their precision.
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to(dtype),
        text_encoder=copy.deepcopy(text_encoder).to(dtype),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to(dtype),
        scheduler=DDIMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _publish(pipe, Path(out))


def save_sdxl_diffusers_folder(out: Path, parts, dtype: torch.dtype = torch.float16) -> Path:
    """Write SDXL components (``sdxl.SdxlComponents``) as a StableDiffusionXLPipeline folder, weights
    in ``dtype``, with SDXL's Euler scheduler at the training's prediction type and terminal SNR."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=copy.deepcopy(parts.vae).to(dtype),
        text_encoder=copy.deepcopy(parts.text_encoder).to(dtype),
        text_encoder_2=copy.deepcopy(parts.text_encoder_2).to(dtype),
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=copy.deepcopy(parts.unet).to(dtype),
        scheduler=EulerDiscreteScheduler.from_config(parts.noise_scheduler.config),
    )
    return _publish(pipe, Path(out))


def _publish(pipe, out: Path) -> Path:
    """Save the pipeline beside ``out`` and swap it in whole, with the marker that says it is sdtune's."""
    tmp = atomic.tmp_beside(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({"written_by": "sdtune", "version": sdtune.__version__}), encoding="utf-8")
        return atomic.publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
