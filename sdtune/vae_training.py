"""Train an AutoencoderKL from scratch: reconstruction + KL, then the latent scaling factor.

A base model trained from scratch needs a VAE that really encodes its images
before the UNet can learn anything on the latents. This is the first stage of
Stable Diffusion's recipe (Rombach et al. 2022, section 3 and appendix G)
reduced to what flat-colour images need: the per-pixel reconstruction loss
plus a small KL term that keeps the posterior near N(0, I); no perceptual or
adversarial loss. The scaling factor that brings the latents to unit variance
is measured afterwards, as SD's 0.18215 was, and stored in the VAE's config,
where the trainer and every pipeline read it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class VaeReport:
    steps: int
    seconds: float
    reconstruction: float  # mean squared error on [-1, 1] pixels, over all images at full size
    kl: float  # mean KL per latent element
    scaling_factor: float
    losses: list[float] = field(default_factory=list)  # one per step


def load_images(folder: str | Path, side: int) -> torch.Tensor:
    """Every image in ``folder`` (sorted by name) as uint8 (N, 3, side, side); each must be side x side."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{folder} holds no images to train the VAE on")
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            if image.size != (side, side):
                raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}; the VAE trains on {side}x{side} images")
            arrays.append(np.asarray(image.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1], what SD's VAE takes and gives."""
    return images.float() / 127.5 - 1.0


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator,
             shape_weight: float = 0.0):
    """(total, reconstruction L1, KL per element) for a batch of [-1, 1] pixels, decoding a
    sample of the posterior (the reparameterisation trick). L1 as in SD's autoencoder: it
    keeps flat areas flat and edges sharp where MSE blurs them. ``shape_weight``: pixels
    that stand out from the image's border colour count ``1 + shape_weight`` times (see
    ``shape_pixels``)."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    if shape_weight:
        weights = 1 + shape_weight * shape_pixels(pixels)
        l1 = ((reconstruction - pixels).abs() * weights).sum() / (weights.sum() * pixels.shape[1])
    else:
        l1 = torch.nn.functional.l1_loss(reconstruction, pixels)
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # diffusers sums the KL over each latent
    return l1 + kl_weight * kl, l1, kl


def shape_pixels(pixels: torch.Tensor, border: int = 4, threshold: float = 0.3) -> torch.Tensor:
    """1 where a pixel of [-1, 1] ``pixels`` (B, C, H, W) differs from its image's border colour
    (the median of the top and bottom ``border`` rows) by more than ``threshold`` summed over
    channels, else 0; (B, 1, H, W). A shape covers 2-20 % of an image, so a plain mean learns
    the background's colours first and leaves the shapes' hues drifting (red toward orange)."""
    ring = torch.cat([pixels[..., :border, :].flatten(2), pixels[..., -border:, :].flatten(2)], -1)
    background = ring.median(-1).values[..., None, None]
    return ((pixels - background).abs().sum(1, keepdim=True) > threshold).float()


def random_crops(images: torch.Tensor, index: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A ``crop`` x ``crop`` window of each picked image at a random place, mirrored at random.

    The VAE is convolutional, so windows teach it the same mapping at a fraction of
    the cost of whole images."""
    side = images.shape[-1]
    out = []
    for i in index.tolist():
        y, x = (torch.randint(0, side - crop + 1, (2,), generator=generator)).tolist()
        window = images[i, :, y : y + crop, x : x + crop]
        out.append(window.flip(-1) if torch.rand((), generator=generator) < 0.5 else window)
    return torch.stack(out)


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-4,
    crop: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log_every: int = 50,
    shape_weight: float = 0.0,
    warmup_fraction: float = 0.1,
) -> VaeReport:
    """Train ``vae`` in place on uint8 ``images`` (N, 3, H, W) for ``steps`` AdamW steps with a
    one-cycle learning rate (rising over ``warmup_fraction`` of them); set its scaling
    factor; return what it reached. ``shape_weight``: see ``vae_loss``."""
    if steps < 4:
        raise ValueError(f"the VAE needs at least 4 training steps (a one-cycle rise and fall), got {steps}")
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=warmup_fraction)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = to_model_range(random_crops(images, index, min(crop, images.shape[-1]), generator)).to(device)
        loss, mse, kl = vae_loss(vae, batch, kl_weight, generator, shape_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"sdtune: vae step {step + 1}/{steps} L1 {mse.item():.4f} kl {kl.item():.3f}", flush=True)
    losses = torch.stack(losses).tolist()
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError("the VAE's loss became non-finite; lower its learning rate")
    vae.eval()
    mse, kl, scaling = evaluate_vae(vae, images, device)
    vae.register_to_config(scaling_factor=scaling)
    return VaeReport(steps, time.perf_counter() - started, mse, kl, scaling, losses)


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, images: torch.Tensor, device, batch_size: int = 64) -> tuple[float, float, float]:
    """(reconstruction MSE of the posterior mean, KL per element, scaling factor) over all of
    ``images``. The scaling factor is 1 / std of the latents, so the diffusion model sees
    unit-variance inputs (how SD's 0.18215 was chosen)."""
    mses, kls, latents = [], [], []
    for start in range(0, len(images), batch_size):
        pixels = to_model_range(images[start : start + batch_size]).to(device)
        posterior = vae.encode(pixels).latent_dist
        mses.append(torch.nn.functional.mse_loss(vae.decode(posterior.mean).sample, pixels, reduction="sum").item())
        kls.append(posterior.kl().sum().item())
        latents.append(posterior.mean.flatten().cpu())
    latents = torch.cat(latents)
    return sum(mses) / images[..., :].numel(), sum(kls) / latents.numel(), float(1.0 / latents.std())


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> list[Image.Image]:
    """Decode the posterior mean of each uint8 image: what the VAE keeps of it."""
    pixels = vae.decode(vae.encode(to_model_range(images)).latent_dist.mean).sample
    out = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in out]
