"""Diffusion maths for training: schedule, noise, targets and loss weights.

Each function is small and pure, and is tested against an independent float64
computation (shared/REFERENCE_VALUES.md). Where diffusers already has the
formula (``DDPMScheduler.get_velocity``, ``rescale_betas_zero_snr``,
``training_utils.compute_snr``) we call it rather than re-derive it.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def make_noise_scheduler(base_config: dict, prediction_type: str, zero_terminal_snr: bool) -> DDPMScheduler:
    """The training schedule of a base model, with our prediction type and terminal SNR.

    ``base_config`` is the base model's scheduler config (any diffusers scheduler;
    SD ships PNDM/DDIM configs with the same betas). Zero terminal SNR is Lin et
    al. 2023, Algorithm 1, applied by diffusers' ``rescale_betas_zero_snr``; the
    SNR table is derived from the rescaled ``alphas_cumprod`` every time it is
    asked for (``snr``), so it can never be stale.
    """
    return DDPMScheduler.from_config(
        base_config,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        # Lin et al. 2023, section 3.3: sample from the last timestep when SNR is 0 there.
        timestep_spacing="trailing" if zero_terminal_snr else base_config.get("timestep_spacing", "leading"),
    )


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at ``timesteps``, in fp32."""
    return compute_snr(scheduler, timesteps).float()


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output: the noise (epsilon) or the velocity.

    v-prediction (Salimans & Ho 2022, section 4): ``v = sqrt(abar)*noise - sqrt(1-abar)*x0``.
    ``get_velocity`` casts ``abar`` to the sample's dtype, so compute in fp32.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise.float()
    if kind == "v_prediction":
        return scheduler.get_velocity(latents.float(), noise.float(), timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}; use epsilon or v_prediction")


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, section 3.4).

    epsilon target: ``min(snr, gamma) / snr``; v target: ``min(snr, gamma) / (snr + 1)``.
    For epsilon the limit at SNR 0 is 1 (``min(snr, gamma) == snr`` there), which
    ``torch.where`` returns instead of ``0 / 0``.
    """
    snr_values = snr_values.float()
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr_values < gamma, torch.ones_like(snr_values), gamma / snr_values)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def sample_timesteps(batch_size: int, num_train_timesteps: int, device, generator=None) -> torch.Tensor:
    """Uniform integer timesteps in ``[0, T)``."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0, generator=None) -> torch.Tensor:
    """Gaussian noise like ``latents``; with ``noise_offset`` a per-sample, per-channel
    constant of that std is added, which lets the model shift mean brightness
    (Guttenberg 2023, "Diffusion with Offset Noise")."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=torch.float32, generator=generator)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), device=latents.device, generator=generator)
    return noise


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted per sample, averaged over the batch (fp32)."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator=None) -> torch.Tensor:
    """Draw from the cached VAE posterior ``N(mean, std^2)`` and scale to the UNet's range."""
    eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    return (mean + std * eps) * scaling_factor


def denoising_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    conditioning: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """The training objective for one batch: noise the latents to ``x_t``, predict,
    compare with the target (epsilon or v), weighted per sample by min-SNR if asked."""
    noisy = scheduler.add_noise(latents.float(), noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, conditioning, return_dict=False)[0]
    weights = None
    if min_snr_gamma is not None:
        weights = min_snr_weights(snr(scheduler, timesteps), min_snr_gamma, scheduler.config.prediction_type)
    return diffusion_loss(prediction, target, weights)
