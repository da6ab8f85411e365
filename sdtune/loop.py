"""The pieces of the training loop besides its order of events: the data order and its
loader, one batch's conditioning and loss, and the agreement between processes on bad batches."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from sdtune import training_state
from sdtune.compute import highest_on_any_process
from sdtune.conditioning import unet_conditioning
from sdtune.data.buckets import BucketBatchSampler
from sdtune.data.captions import drop_caption_parts
from sdtune.diffusion import (
    Objective,
    denoising_loss,
    perturb_noise,
    sample_latents,
    sample_noise,
    sample_timesteps,
)
from sdtune.run_report import NAN_ADVICE

MAX_SKIPPED_BATCHES = 20  # train.on_nan: skip gives up after this many


@dataclass(frozen=True)
class StepSetup:
    """What every batch's loss needs besides the batch: the schedule and objective, the
    latents' scaling, the timestep and noise settings (train.*), and the empty caption's
    conditioning that caption dropout mixes in."""

    scheduler: DDPMScheduler
    objective: Objective
    scaling: float
    min_timestep: int
    max_timestep: int
    timestep_sampling: str
    logit_mean: float
    logit_std: float
    noise_offset: float
    noise_offset_random_strength: bool
    input_perturbation: float
    empty_conditioning: dict
    caption_dropout: float


def batch_loss(unet, encoder, batch: dict, setup: StepSetup, trains_encoder: bool, generator: torch.Generator) -> torch.Tensor:
    """One batch's loss: its conditioning (``encoder`` runs when the text is not cached), a
    latent drawn from the cached posterior, noise and timesteps, all drawn from
    ``generator`` (keyed by the batch's place in the data order). A batch may carry per-sample
    loss weights (``loss_weight``: DreamBooth class images) and latent-resolution loss masks (``mask``)."""
    text, added = conditioning(batch, encoder, trains_encoder, setup.empty_conditioning, setup.caption_dropout, generator)
    latents = sample_latents(batch["mean"], batch["std"], setup.scaling, generator)
    noise = sample_noise(latents, setup.noise_offset, setup.noise_offset_random_strength, generator)
    timesteps = sample_timesteps(latents.shape[0], latents.device, setup.min_timestep, setup.max_timestep, setup.timestep_sampling,
                                 setup.logit_mean, setup.logit_std, generator)
    input_noise = perturb_noise(noise, setup.input_perturbation, generator) if setup.input_perturbation else None
    return denoising_loss(unet, setup.scheduler, latents, text, noise, timesteps, setup.objective, input_noise, **added,
                          sample_weights=batch.get("loss_weight"), mask=batch.get("mask"))


def make_loader(dataset, buckets: list[tuple[int, int]], batch_size: int, seed: int, num_workers: int, accelerator):
    """Each batch comes from one bucket, in an order fixed by the seed. The loader is not
    handed to accelerate: the sampler shards it and fixes the order (for exact resume)."""
    order = BucketBatchSampler(buckets, batch_size, seed, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=order, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: starting an epoch would otherwise draw from the global RNG,
        # which a resumed run restores mid-epoch, shifting all noise after it.
        generator=torch.Generator().manual_seed(seed),
    )
    return order, loader


def conditioning(batch: dict, encoder, trains: bool, empty: dict, dropout: float, generator) -> tuple[torch.Tensor, dict]:
    """The UNet's conditioning for ``batch`` and its other keyword arguments (SDXL's pooled
    embedding and size/crop ids), some captions dropped, every part of a caption together
    (``empty``: the empty caption's parts): cached, or from ``encoder`` when it runs in the
    loop (with gradients only while it ``trains``: after train.text_encoder_steps it runs
    without, so it gets none and AdamW leaves it be)."""
    text = drop_caption_parts({key: batch[key] for key in empty}, empty, dropout, generator)
    with contextlib.nullcontext() if trains or encoder is None else torch.no_grad():
        return unet_conditioning(text, encoder, batch.get("time_ids"))


def all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (a batch is skipped by all, or by none)."""
    return not highest_on_any_process(int(not torch.isfinite(loss).all().item()), accelerator)


def skip_batch(skipped: int, step: int, optimizer) -> int:
    """train.on_nan: skip drops a batch whose loss is not finite, up to a limit."""
    skipped += 1
    if skipped > MAX_SKIPPED_BATCHES:
        raise FloatingPointError(f"{skipped} batches had a non-finite loss by step {step}; {NAN_ADVICE}")
    optimizer.zero_grad(set_to_none=True)
    return skipped


def batches(loader, order: BucketBatchSampler, position: training_state.Position, device: torch.device):
    """(epoch, batches of it consumed, batch on device) forever, from where ``position`` says."""
    epoch, consumed = position.epoch, position.batch_in_epoch
    if consumed >= len(loader):
        epoch, consumed = epoch + 1, 0
    while True:
        order.start(epoch, skip=consumed)
        for batch in loader:
            consumed += 1
            yield epoch, consumed, {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        epoch, consumed = epoch + 1, 0
