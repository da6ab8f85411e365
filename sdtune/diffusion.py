"""Diffusion maths for training: schedule, noise, targets and loss weights.

Each function is small and pure, and is tested against an independent float64
computation (shared/REFERENCE_VALUES.md). Where diffusers already has the
formula (``DDPMScheduler.get_velocity``, ``rescale_betas_zero_snr``,
``training_utils.compute_snr``) we call it rather than re-derive it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
    if prediction_type == "epsilon":
        return torch.where(snr_values < gamma, torch.ones_like(snr_values), gamma / snr_values)
    if prediction_type == "v_prediction":
        return torch.clamp(snr_values, max=gamma) / (snr_values + 1.0)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def sample_timesteps(
    batch_size: int,
    device,
    low: int,
    high: int,
    method: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator=None,
) -> torch.Tensor:
    """Integer timesteps in ``[low, high)``.

    ``uniform``: every timestep equally likely (DDPM). ``logit_normal``: ``u =
    sigmoid(N(mean, std))`` mapped onto the range, which concentrates training
    on the middle timesteps (Esser et al. 2024, "Scaling Rectified Flow
    Transformers", section 3.1; mean > 0 shifts towards noisier steps).
    """
    if method == "uniform":
        return torch.randint(low, high, (batch_size,), device=device, generator=generator)
    if method == "logit_normal":
        normal = torch.randn(batch_size, device=device, generator=generator) * logit_std + logit_mean
        steps = low + torch.sigmoid(normal) * (high - low)
        return steps.long().clamp(low, high - 1)
    raise ValueError(f"unknown timestep sampling {method!r}; use uniform or logit_normal")


def sample_noise(
    latents: torch.Tensor, noise_offset: float = 0.0, random_strength: bool = False, generator=None
) -> torch.Tensor:
    """Gaussian noise like ``latents``; with ``noise_offset`` a per-sample, per-channel
    constant of that std is added, which lets the model shift mean brightness
    (Guttenberg 2023, "Diffusion with Offset Noise"). ``random_strength`` scales
    the offset per sample by U(0, 1), as kohya's option does."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=torch.float32, generator=generator)
    if noise_offset:
        b, c = latents.shape[:2]
        strength = torch.full((b, 1, 1, 1), noise_offset, device=latents.device)
        if random_strength:
            strength = strength * torch.rand((b, 1, 1, 1), device=latents.device, generator=generator)
        noise = noise + strength * torch.randn((b, c, 1, 1), device=latents.device, generator=generator)
    return noise


def perturb_noise(noise: torch.Tensor, strength: float, generator=None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias
    in Diffusion Models", eq. 9): the noise that makes ``x_t`` gets an extra
    ``strength * N(0, 1)``; the training target keeps the unperturbed noise."""
    if not strength:
        return noise
    return noise + strength * torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)


def debiased_weights(snr_values: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation loss weights (Yu et al. 2024, "Debias the Training of
    Diffusion Models", eq. 11): ``1 / sqrt(snr)`` on the epsilon loss.

    A v-prediction loss is ``(snr + 1) / snr`` times the epsilon loss of the same
    prediction (``v - v' = (eps - eps') / sqrt(abar)``), so the same weighting of a
    v loss is ``sqrt(snr) / (snr + 1)``, which is finite (0) at SNR 0.
    """
    snr_values = snr_values.float()
    if prediction_type == "epsilon":
        return torch.rsqrt(snr_values)
    if prediction_type == "v_prediction":
        return torch.sqrt(snr_values) / (snr_values + 1.0)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "mse", huber_c: float = 0.1) -> torch.Tensor:
    """Per-element loss in fp32.

    ``huber`` is the pseudo-Huber loss ``2c(sqrt(d^2 + c^2) - c)`` (Song & Dhariwal
    2023, section 3.3): ``d^2`` for small errors, ``2c|d|`` for large ones, so a
    few outlier pixels cannot dominate. ``smooth_l1`` is the same divided by c.
    """
    diff = prediction.float() - target.float()
    if loss_type == "mse":
        return diff.pow(2)
    pseudo_huber = 2.0 * (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c)
    if loss_type == "huber":
        return huber_c * pseudo_huber
    if loss_type == "smooth_l1":
        return pseudo_huber
    raise ValueError(f"unknown loss type {loss_type!r}; use mse, huber or smooth_l1")


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    loss_type: str = "mse",
    huber_c: float = 0.1,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss per sample, optionally weighted per sample, averaged over the batch (fp32).

    ``weights`` (min-SNR, debiased) and ``sample_weights`` (DreamBooth's prior weight:
    1 for instance images, train.prior_loss_weight for class images) multiply. A
    ``mask`` (``B x 1 x h x w`` at latent resolution, 0 to 1) makes a sample's loss
    ``sum(mask * loss) / sum(mask)`` over its elements (channels included), so a sample's
    loss stays on the same scale however much of it is masked; an all-ones mask is the
    plain mean, an all-zero one contributes 0."""
    per_element = elementwise_loss(prediction, target, loss_type, huber_c)
    dims = tuple(range(1, prediction.ndim))
    if mask is None:
        per_sample = per_element.mean(dim=dims)
    else:
        mask = mask.float().expand_as(per_element)
        per_sample = (per_element * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1e-12)
    if weights is not None:
        per_sample = per_sample * weights
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.float()
    return per_sample.mean()


def reseed(generator: torch.Generator, seed: int, epoch: int, batch: int) -> torch.Generator:
    """``generator`` seeded for batch ``batch`` of ``epoch`` in the data order: what the
    batch draws (caption dropout, latent sample, noise, timesteps) depends only on where it
    is in the order, not on which process draws it or what was drawn before."""
    key = hashlib.blake2b(f"{seed}:{epoch}:{batch}".encode(), digest_size=8).digest()
    return generator.manual_seed(int.from_bytes(key, "little") >> 1)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator=None) -> torch.Tensor:
    """Draw from the cached VAE posterior ``N(mean, std^2)`` and scale to the UNet's range."""
    eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    return (mean + std * eps) * scaling_factor


@dataclass(frozen=True)
class Objective:
    """How a batch's prediction error becomes the loss."""

    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    loss_type: str = "mse"
    huber_c: float = 0.1


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, objective: Objective) -> torch.Tensor | None:
    kind = scheduler.config.prediction_type
    if objective.min_snr_gamma is not None:
        return min_snr_weights(snr(scheduler, timesteps), objective.min_snr_gamma, kind)
    if objective.debiased_estimation:
        return debiased_weights(snr(scheduler, timesteps), kind)
    return None


def denoising_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    conditioning: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    objective: Objective = Objective(),
    input_noise: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training objective for one batch: noise the latents to ``x_t`` (with
    ``input_noise`` when perturbed), predict, compare with the target made from
    the clean ``noise`` (epsilon or v), weighted per sample if asked. SDXL's UNet
    also takes ``added_cond_kwargs`` (pooled text embedding, size/crop ids).
    ``sample_weights`` and ``mask``: see ``diffusion_loss``."""
    noisy = scheduler.add_noise(latents.float(), noise if input_noise is None else input_noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    added = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
    prediction = unet(noisy, timesteps, conditioning, return_dict=False, **added)[0]
    weights = loss_weights(scheduler, timesteps, objective)
    return diffusion_loss(prediction, target, weights, objective.loss_type, objective.huber_c, sample_weights, mask)
