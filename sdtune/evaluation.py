"""Seeing a run while it trains: the validation loss on held-out images and preview grids.

Both leave the training untouched: they use their own generators (the loss) or
save and restore the training RNG (the previews), so a run with them ends with
the same weights as a run without.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune import atomic, grid, training_state
from sdtune.adapters import adapters_off
from sdtune.data.cache import CachedDataset
from sdtune.diffusion import denoising_loss
from sdtune.conditioning import text_part, unet_conditioning
from sdtune.samplers import generate
from sdtune.sdxl import SdxlComponents, split_text_encoders


@torch.no_grad()
def validation_loss(
    unet, text_encoder, scheduler, scaling_factor: float, dataset: CachedDataset, timesteps: list[int], seed: int, device
) -> dict[int, float]:
    """Mean unweighted loss on the held-out images at fixed timesteps, with noise
    fixed per image by ``seed`` and the posterior mean as latents: the same
    numbers for the same weights, so the curve moves only when the model does.
    ``text_encoder`` (``sdxl.text_encoders``) is None when the dataset holds cached
    text-encoder outputs."""
    was_training = unet.training
    unet.eval()
    totals = dict.fromkeys(timesteps, 0.0)
    for index in range(len(dataset)):
        item = dataset[(index, 0)]
        latents = item["mean"][None].to(device) * scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + index)).to(device)
        text = {key: value[None].to(device) for key, value in text_part(item).items()}
        conditioning, added = unet_conditioning(text, text_encoder, item["time_ids"][None] if "time_ids" in item else None)
        for t in timesteps:
            loss = denoising_loss(unet, scheduler, latents, conditioning, noise, torch.tensor([t], device=device), **added)
            totals[t] += loss.item() / len(dataset)
    unet.train(was_training)
    return totals


def preview_grid(
    parts, unet, text_encoder, sampler, prompts: list[str], steps: int, cfg: float, cfg_rescale: float, seed: int,
    size: int, device: torch.device, autocast, ema=None, params=None, base_row: bool = False,
) -> Image.Image:
    """One row of ``prompts`` drawn with ``sampler`` (a second row with the EMA
    weights when ``ema`` is given), every image from ``seed`` so grids compare
    across steps. ``base_row``: first a row with the LoRA switched off, the base
    model, for the same seeds. The VAE and text encoder(s) come to ``device`` and go back."""
    rng = training_state.rng_states()
    homes = {module: next(module.parameters()).device for module in (parts.vae, text_encoder, unet)}  # under FSDP a gathered UNet is on the CPU
    pipe = preview_pipeline(parts, unet.to(device), text_encoder.to(device), parts.vae.to(device))
    pipe.set_progress_bar_config(disable=True)

    def row() -> list[Image.Image]:
        with torch.no_grad(), autocast():
            return generate(pipe, prompts, sampler, steps, cfg, cfg_rescale, [seed] * len(prompts), (size, size))

    was_training = unet.training
    unet.eval()
    rows, labels = [], []
    if base_row:
        with adapters_off(unet, text_encoder):
            rows.append(row())
        labels.append("base")
    rows.append(row())
    labels.append("LoRA" if base_row else "raw")
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
        rows.append(row())
        ema.restore(params)
        labels.append("EMA")
    unet.train(was_training)
    for module, home in homes.items():
        module.to(home)
    training_state.restore_rng(rng)
    return grid.draw_grid(rows, prompts, labels if len(rows) > 1 else [])


def preview_pipeline(parts, unet, text_encoder, vae):
    """A diffusers pipeline around the model as it trains: StableDiffusionXLPipeline for SDXL
    (``text_encoder`` as ``sdxl.text_encoders`` gives it; the same size conditioning, at the
    drawn size), StableDiffusionPipeline otherwise."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(parts, SdxlComponents):
        text_encoder, text_encoder_2 = split_text_encoders(text_encoder)
        # Caption dropout trains the empty caption's encoding as the unconditional one, so CFG
        # uses it too (SDXL base's pipeline config puts zeros there instead).
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2, unet=unet, scheduler=parts.noise_scheduler, force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=parts.tokenizer, unet=unet, scheduler=parts.noise_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_preview(image: Image.Image, folder, step: int, trackers) -> Path:
    """``previews/<name>/step-<N>.png`` of the run's ``folder`` (recorded as the run's),
    and the image to TensorBoard or W&B."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = atomic.write_bytes(folder.previews / f"step-{step:06d}.png", buffer.getvalue())
    folder.add(path)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("preview", np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({"preview": [image]}, step=step)
    return path
