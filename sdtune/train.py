"""Fine-tune a Stable Diffusion 1.x/2.x UNet (LoRA or full) from a recipe.

    accelerate launch sdtune/train.py --recipe recipes/lora_vpred.yaml [--set train.max_steps=500]

The whole run reads top to bottom in ``train``: load the base model, scan the
data, fill the latent (and text) caches, set up what is trained, run the loop,
write the results. Everything it calls takes plain values, not the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:
    # Run as a file (`accelerate launch sdtune/train.py`): import the package from
    # the checkout, and keep sdtune/ itself off the path so its module names
    # cannot shadow installed ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from sdtune import atomic, training_state
from sdtune.adapters import add_lora, trainable_parameters
from sdtune.data.buckets import BucketBatchSampler
from sdtune.data.cache import CachedDataset, CacheStats, cache_latents, cache_text, default_cache_dir, report_caches
from sdtune.data.captions import drop_captions, tokenize
from sdtune.data.plan import BucketSpec, DataPlan, plan_dataset, skipped_report, warnings_for
from sdtune.data.sources import Source
from sdtune.diffusion import (
    Objective,
    denoising_loss,
    perturb_noise,
    sample_latents,
    sample_noise,
    sample_timesteps,
)
from sdtune.export.checkpoint import save_checkpoint
from sdtune.export.diffusers_folder import save_diffusers_folder
from sdtune.export.kohya import check_sd2_text_encoder_targets, kohya_state_dict
from sdtune.export.metadata import lora_metadata
from sdtune.models import cpu_has_native_bf16, encode_prompts, load_components, set_attention
from sdtune.optim import make_lr_scheduler, make_optimizer
from sdtune.recipe import DataSection, Recipe, load_recipe
from sdtune.report import render_report

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny_demo.yaml"
MAX_SKIPPED_BATCHES = 20
NAN_ADVICE = "Likely causes: train.learning_rate too high, or fp16 overflow (try bf16)"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainResult:
    output: Path  # the LoRA file, or a full fine-tune's single file (its diffusers folder when that is the only format)
    losses: list[float]  # one per micro-batch
    latent_cache: CacheStats
    text_cache: CacheStats | None  # None when the text encoder runs in the loop (it trains, or tags are shuffled)
    unet: torch.nn.Module  # as trained (with its LoRA layers), for callers that go on using it
    text_encoder: torch.nn.Module
    steps: int  # optimizer steps done when the run ended
    stopped_by: int | None = None  # the signal that interrupted the run (state saved), else None
    validation: list[tuple[int, dict[int, float]]] = field(default_factory=list)  # (step, {timestep: loss})


def train(recipe: Recipe, resume: str | None = None) -> TrainResult:
    model, data, lora, opt, out = recipe.model, recipe.data, recipe.lora, recipe.train, recipe.output
    diffusers_logging.disable_progress_bar()  # per-file "Loading weights" bars hide ours
    transformers_logging.disable_progress_bar()
    out_dir = Path(out.dir)
    single_file, folder = out_dir / f"{out.name}.safetensors", out_dir / out.name
    if opt.method == "lora":
        results = [single_file]
    else:
        results = [path for kind, path in (("single_file", single_file), ("diffusers", folder)) if kind in recipe.export.formats]
    result_path = results[0]
    for path in results:
        if path.exists() and not out.overwrite and resume is None:
            raise FileExistsError(f"{path} exists from an earlier run; set output.overwrite=true or another output.name")
    if resume is None and training_state.list_checkpoints(out_dir) and not out.overwrite:
        raise FileExistsError(
            f"{training_state.checkpoint_dir(out_dir)} holds an earlier run's checkpoints; continue it with "
            "--resume latest, or set output.overwrite=true to start over"
        )
    resume_from = training_state.resolve(resume, out_dir) if resume else None

    accelerator = Accelerator(
        mixed_precision=opt.mixed_precision,
        gradient_accumulation_steps=opt.gradient_accumulation_steps,
        log_with=None if opt.logger == "none" else opt.logger,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )
    if opt.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    if opt.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16() and accelerator.is_local_main_process:
        print(f"sdtune: warning: this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}), where bf16 "
              "convolutions run far slower than fp32 (benchmarks/precision.py); set train.mixed_precision: no", file=sys.stderr)
    set_seed(opt.seed, device_specific=True, deterministic=opt.deterministic)
    is_main = accelerator.is_local_main_process
    device, weight_dtype = accelerator.device, DTYPES[opt.mixed_precision]
    train_te = recipe.trains_text_encoder

    # Base model and data.
    unet_dtype = weight_dtype if opt.method == "lora" else torch.float32  # full: fp32 master weights
    parts = load_components(model.path, model.prediction_type, model.zero_terminal_snr, unet_dtype, model.allow_pickle)
    if train_te:
        check_sd2_text_encoder_targets(lora.text_encoder_target_modules, parts.base_model_version)
    if lora.merge_first:
        _merge_first(parts, lora.merge_first, lora.merge_first_weight)
    # The scan: every file is checked and bucketed before any work; problems stop the
    # run here with the full list, or are skipped and written down (data.on_bad_image).
    plan = plan_data(data, opt.seed, parts.tokenizer)
    if is_main:
        print(f"sdtune: {plan.images} images ({len(plan.train)} per epoch) from {', '.join(plan.sources)}; base {parts.name} ({parts.base_model_version})")
        for line in warnings_for(plan):
            print(f"sdtune: {line}", file=sys.stderr)
        if plan.skipped:
            atomic.write_text(out_dir / f"{out.name}.skipped.tsv", skipped_report(plan))

    # Caches: each process encodes its share of what is missing; the frozen
    # encoders leave the device once they are built. Held-out images are cached
    # too, for validation.
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    shard = (accelerator.process_index, accelerator.num_processes)
    items = plan.train + plan.validation
    latent_paths, latent_stats = cache_latents(items, parts.vae, parts.vae_sha256, cache_dir, device, shard=shard, show_progress=is_main)
    latent_paths, val_latent_paths = latent_paths[: len(plan.train)], latent_paths[len(plan.train) :]
    text_stats = None
    # Shuffled tags make a new caption each epoch, so the text encoder then runs in the loop.
    text_in_loop = not recipe.caches_text
    if text_in_loop:
        dataset = CachedDataset(
            latent_paths, captions=[i.sample.caption for i in plan.train], tokenizer=parts.tokenizer,
            prefixes=[i.sample.prefix for i in plan.train], shuffle=data.shuffle_tags, keep_tokens=data.keep_tokens, seed=opt.seed,
        )
        empty_conditioning = tokenize(parts.tokenizer, [""])[0]
        val_dataset = CachedDataset(
            val_latent_paths, captions=[i.sample.caption for i in plan.validation], tokenizer=parts.tokenizer,
            prefixes=[i.sample.prefix for i in plan.validation],
        )
        if not train_te:
            parts.text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    else:
        text_paths, text_stats = cache_text(
            [i.caption for i in items] + [""], parts.tokenizer, parts.text_encoder, parts.text_encoder_sha256, cache_dir, device, shard=shard, show_progress=is_main
        )
        accelerator.wait_for_everyone()
        empty_conditioning = load_file(text_paths[-1])["hidden_states"]
        dataset = CachedDataset(latent_paths, text_paths=text_paths[: len(plan.train)])
        val_dataset = CachedDataset(val_latent_paths, text_paths=text_paths[len(plan.train) : len(items)])
        parts.text_encoder.to("cpu")
    accelerator.wait_for_everyone()
    parts.vae.to("cpu")
    latent_stats, text_stats = report_caches(latent_stats, text_stats, cache_dir, accelerator)

    # What is trained. Frozen weights are stored in the autocast dtype; trainable
    # ones stay fp32 so small updates are not rounded away.
    unet, text_encoder = parts.unet, parts.text_encoder
    set_attention(unet, opt.attention, device)
    if opt.method == "lora":
        unet.to(device)
        add_lora(unet, lora.rank, lora.alpha, lora.dropout, lora.unet_targets(), lora.conv_rank, lora.conv_alpha, lora.init)
        if train_te:
            text_encoder.to(device, dtype=weight_dtype)
            add_lora(text_encoder, lora.rank, lora.alpha, lora.dropout, lora.text_encoder_target_modules, init=lora.init)
            cast_training_params(text_encoder, dtype=torch.float32)
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(device).requires_grad_(True)
        if train_te:
            text_encoder.to(device).requires_grad_(True)
    if opt.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
    groups = [{"params": trainable_parameters(unet), "lr": opt.learning_rate}]
    if train_te:
        groups.append({"params": trainable_parameters(text_encoder), "lr": opt.text_encoder_learning_rate or opt.learning_rate})
    optimizer = make_optimizer(groups, opt.optimizer, (opt.adam_beta1, opt.adam_beta2), opt.adam_weight_decay, opt.adam_epsilon)
    # The prepared scheduler steps once per process per optimizer step.
    lr_scheduler = make_lr_scheduler(
        optimizer,
        opt.lr_scheduler,
        opt.lr_warmup_steps * accelerator.num_processes,
        opt.max_steps * accelerator.num_processes,
        opt.lr_num_cycles,
        opt.lr_power,
    )
    # Each batch comes from one bucket (its latents share a size), in an order fixed
    # by the seed. The loader is not handed to accelerate: the sampler shards it and
    # fixes the order (for exact resume), and accumulation counts only micro-batches.
    order = BucketBatchSampler(
        [i.crop.bucket for i in plan.train], opt.batch_size, opt.seed, accelerator.process_index, accelerator.num_processes
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=order,
        num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0,
        pin_memory=device.type == "cuda",
        # Its own generator: starting an epoch would otherwise draw from the global
        # RNG, which a resumed run restores mid-epoch, shifting all noise after it.
        generator=torch.Generator().manual_seed(opt.seed),
    )
    trained = [unet, text_encoder] if train_te else [unet]
    *trained, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    unet = trained[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler, scaling = parts.noise_scheduler, parts.vae.config.scaling_factor
    empty_conditioning = empty_conditioning.to(device)
    objective = Objective(opt.min_snr_gamma, opt.debiased_estimation, opt.loss_type, opt.huber_c)
    t_low, t_high = opt.min_timestep, opt.max_timestep or scheduler.config.num_train_timesteps
    if t_high > scheduler.config.num_train_timesteps:
        raise ValueError(f"train.max_timestep {t_high} is past the schedule's {scheduler.config.num_train_timesteps} steps")
    ema = None
    if recipe.ema.enabled:
        ema = EMAModel(params, decay=recipe.ema.decay, use_ema_warmup=recipe.ema.warmup, inv_gamma=1.0, power=2 / 3)
    models = {"unet": accelerator.unwrap_model(unet)}
    if train_te:
        models["text_encoder"] = accelerator.unwrap_model(trained[1])
    position = training_state.Position(step=0, epoch=0, batch_in_epoch=0, micro_steps=0)
    if resume_from is not None:
        position = _resume(resume_from, recipe, models, optimizer, lr_scheduler, ema, accelerator)
        if is_main:
            print(f"sdtune: resumed from {resume_from} at step {position.step}")
    if accelerator.is_main_process:
        accelerator.init_trackers(out.name, config=_flat(recipe.model_dump(mode="json")))

    # The loop. Per step only the UNet (and TE) forward/backward and the
    # optimizer cost time; the host syncs only at log intervals (and every step
    # with train.on_nan: skip, which must look at each loss).
    losses: list[torch.Tensor] = []
    validation: list[tuple[int, dict[int, float]]] = []
    history: dict[str, list[tuple[float, float]]] = {"loss": [], "lr": []}
    previews: list[tuple[int, Path]] = []
    step, skipped, started = position.step, 0, time.perf_counter()
    ckpt = recipe.checkpoint
    bar = tqdm(total=opt.max_steps, initial=step, desc="training", unit="step", disable=not is_main)
    batches = _batches(loader, order, position, device)
    for module in trained:
        module.train()
    stop = training_state.StopOnSignal()
    with stop:
        while step < opt.max_steps:
            epoch, batch_in_epoch, batch = next(batches)
            with accelerator.accumulate(*trained):
                if text_in_loop:
                    ids = drop_captions(batch["input_ids"], empty_conditioning, data.caption_dropout)
                    conditioning = encode_prompts(trained[1] if train_te else text_encoder, ids)
                else:
                    conditioning = drop_captions(batch["encoder_hidden_states"], empty_conditioning, data.caption_dropout)
                latents = sample_latents(batch["mean"], batch["std"], scaling)
                noise = sample_noise(latents, opt.noise_offset, opt.noise_offset_random_strength)
                timesteps = sample_timesteps(latents.shape[0], device, t_low, t_high, opt.timestep_sampling, opt.logit_mean, opt.logit_std)
                input_noise = perturb_noise(noise, opt.input_perturbation) if opt.input_perturbation else None
                loss = denoising_loss(unet, scheduler, latents, conditioning, noise, timesteps, objective, input_noise)
                if opt.on_nan == "skip" and not torch.isfinite(loss).item():
                    skipped += 1
                    if skipped > MAX_SKIPPED_BATCHES:
                        raise FloatingPointError(f"{skipped} batches had a non-finite loss by step {step}; {NAN_ADVICE}")
                    optimizer.zero_grad(set_to_none=True)
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients and opt.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, opt.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if train_te and step == opt.text_encoder_steps:
                trained[1].requires_grad_(False)  # no more gradients: AdamW leaves it as it is
            if ema is not None and step % recipe.ema.update_every == 0:
                ema.step(params)
            if step % opt.log_every == 0 or step == opt.max_steps:
                recent = torch.stack(losses[-opt.log_every * opt.gradient_accumulation_steps :]).mean().item()
                if not math.isfinite(recent):
                    raise FloatingPointError(f"loss is {recent} at step {step}; nothing was written. {NAN_ADVICE}")
                lr = lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}")
                accelerator.log({"train/loss": recent, "train/lr": lr}, step=step)
                history["loss"].append((step, recent))
                history["lr"].append((step, lr))
            if len(val_dataset) and (step % recipe.validation.every_steps == 0 or step == opt.max_steps):
                encoder = (trained[1] if train_te else text_encoder) if text_in_loop else None
                per_t = validation_loss(unet, encoder, scheduler, scaling, val_dataset, recipe.validation.timesteps, recipe.validation.seed, device)
                validation.append((step, per_t))
                accelerator.log({"val/loss": sum(per_t.values()) / len(per_t)} | {f"val/loss_t{t}": v for t, v in per_t.items()}, step=step)
            if recipe.preview.prompts and accelerator.is_main_process and (
                step % recipe.preview.every_steps == 0 or step == opt.max_steps
            ):
                encoder = models.get("text_encoder", text_encoder)
                path = _preview(out_dir, step, accelerator, models["unet"], encoder, parts, recipe, ema, params)
                previews.append((step, path))
            epoch_done = batch_in_epoch == len(loader)
            due = (ckpt.every_steps and step % ckpt.every_steps == 0) or (
                ckpt.every_epochs and epoch_done and (epoch + 1) % ckpt.every_epochs == 0
            )
            if (due and step < opt.max_steps) or stop.signal is not None:
                here = training_state.Position(step, epoch, batch_in_epoch, accelerator.step)
                saved = _save_checkpoint(out_dir, here, models, optimizer, lr_scheduler, ema, accelerator, recipe, params)
                if ckpt.export and accelerator.is_main_process:
                    _export(out_dir / f"{out.name}-step{step:06d}", models, ema, params, parts, recipe, step, plan.images)
                if stop.signal is not None:
                    bar.close()
                    if is_main:
                        print(f"sdtune: stopped by signal {stop.signal} after step {step}; state saved to {saved}")
                        print("sdtune: resume with the same command plus --resume latest:")
                        print("  " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv, "--resume", "latest"]))
                    accelerator.end_training()
                    return TrainResult(result_path, _floats(losses), latent_stats, text_stats, models["unet"], models.get("text_encoder", text_encoder), step, stop.signal, validation)
    bar.close()
    accelerator.wait_for_everyone()

    # Results.
    if skipped and is_main:
        print(f"sdtune: skipped {skipped} batches with a non-finite loss")
    if accelerator.is_main_process:
        written = _export(out_dir / out.name, models, ema, params, parts, recipe, step, plan.images)
        atomic.write_text(out_dir / f"{out.name}.recipe.yaml", recipe.to_yaml())
        summary = {"base model": f"{parts.name} ({parts.base_model_version}, {model.prediction_type}"
                   f"{', zero terminal SNR' if model.zero_terminal_snr else ''})", "steps": str(step),
                   "images": str(plan.images), "outputs": ", ".join(str(p) for p in written)}
        atomic.write_text(out_dir / "report.html", render_report(out.name, summary, history, validation, previews, recipe.to_yaml()))
        elapsed = time.perf_counter() - started
        if validation:
            print(f"sdtune: validation loss {sum(validation[-1][1].values()) / len(validation[-1][1]):.4f} at step {validation[-1][0]}")
        print(f"sdtune: trained {step - position.step} steps in {elapsed:.1f}s ({(step - position.step) / elapsed:.2f} steps/s)")
        for path in [*written, out_dir / "report.html"]:
            print(f"sdtune: wrote {path}")
        print(f"sdtune: recipe {out_dir / (out.name + '.recipe.yaml')}; logs {out_dir / 'logs'}")
    accelerator.end_training()
    if ema is not None:
        ema.copy_to(params)  # callers get the model that was exported
    return TrainResult(result_path, _floats(losses), latent_stats, text_stats, models["unet"], models.get("text_encoder", text_encoder), step, None, validation)


def _export(stem: Path, models: dict, ema, params: list, parts, recipe: Recipe, steps: int, num_images: int) -> list[Path]:
    """Write the result (the EMA weights when EMA is on) beside ``stem``: a kohya LoRA
    ``<stem>.safetensors``, or for a full fine-tune a single-file checkpoint
    ``<stem>.safetensors`` and/or a diffusers folder ``<stem>/`` (``export.formats``).
    The training weights are left as they were. Returns the paths written."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        export_dtype, model = DTYPES[recipe.export.dtype], recipe.model
        single_file, folder = stem.with_name(f"{stem.name}.safetensors"), stem
        if recipe.train.method == "lora":
            tensors = kohya_state_dict(
                models["unet"], models.get("text_encoder"), export_dtype, base_model_version=parts.base_model_version
            )
            metadata = lora_metadata(
                base_model_version=parts.base_model_version,
                prediction_type=model.prediction_type,
                zero_terminal_snr=model.zero_terminal_snr,
                rank=recipe.lora.rank,
                alpha=recipe.lora.alpha,
                resolution=recipe.data.resolution,
                steps=steps,
                learning_rate=recipe.train.learning_rate,
                num_images=num_images,
                seed=recipe.train.seed,
                base_model_name=parts.name,
                base_model_sha256=parts.sha256,
                title=recipe.output.name,
                recipe_json=recipe.to_json(),
                trained_text_encoder="text_encoder" in models,
                network_args=_network_args(recipe.lora),
                extra={"sdtune.merged_first": parts.merged_first} if parts.merged_first else None,
            )
            return [atomic.save_safetensors(tensors, single_file, metadata)]
        written = []
        if "single_file" in recipe.export.formats:
            save_checkpoint(
                single_file,
                models["unet"],
                parts.vae,
                parts.text_encoder,
                version=parts.base_model_version,
                prediction_type=model.prediction_type,
                zero_terminal_snr=model.zero_terminal_snr,
                dtype=export_dtype,
                extras=parts.ldm_extras or None,
                title=recipe.output.name,
                extra_metadata={"sdtune.recipe": recipe.to_json(), "sdtune.base_model_sha256": parts.sha256},
            )
            written.append(single_file)
        if "diffusers" in recipe.export.formats:
            save_diffusers_folder(
                folder, models["unet"], parts.vae, parts.text_encoder, parts.tokenizer, parts.noise_scheduler.config, export_dtype
            )
            written.append(folder)
        return written
    finally:
        if ema is not None:
            ema.restore(params)


@torch.no_grad()
def validation_loss(
    unet, text_encoder, scheduler, scaling_factor: float, dataset: CachedDataset, timesteps: list[int], seed: int, device
) -> dict[int, float]:
    """Mean unweighted loss on the held-out images at fixed timesteps, with noise
    fixed per image by ``seed`` and the posterior mean as latents: the same
    numbers for the same weights, so the curve moves only when the model does.
    Uses its own generator; the training RNG is untouched (resume stays exact)."""
    was_training = unet.training
    unet.eval()
    totals = dict.fromkeys(timesteps, 0.0)
    for index in range(len(dataset)):
        item = dataset[(index, 0)]
        latents = item["mean"][None].to(device) * scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + index)).to(device)
        if text_encoder is None:
            conditioning = item["encoder_hidden_states"][None].to(device)
        else:
            conditioning = encode_prompts(text_encoder, item["input_ids"][None].to(device))
        for t in timesteps:
            loss = denoising_loss(unet, scheduler, latents, conditioning, noise, torch.tensor([t], device=device))
            totals[t] += loss.item() / len(dataset)
    unet.train(was_training)
    return totals


def _preview(out_dir: Path, step: int, accelerator, unet, text_encoder, parts, recipe: Recipe, ema, params) -> Path:
    """A grid of recipe.preview.prompts (a second row with the EMA weights when EMA is
    on), saved to previews/step-<N>.png and sent to the trackers. The training RNG
    is saved and restored around it, so previews never change the run."""
    from diffusers import StableDiffusionPipeline

    from sdtune import grid
    from sdtune.sample import default_cfg_rescale, generate, make_sampler, sampling_config

    model, preview = recipe.model, recipe.preview
    rng = training_state.rng_states()
    device = accelerator.device
    homes = {module: next(module.parameters()).device for module in (parts.vae, text_encoder)}
    pipe = StableDiffusionPipeline(
        vae=parts.vae.to(device), text_encoder=text_encoder.to(device), tokenizer=parts.tokenizer, unet=unet,
        scheduler=parts.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    sampler = make_sampler(preview.sampler, sampling_config(parts.noise_scheduler.config, model.prediction_type, model.zero_terminal_snr))
    rescale = preview.cfg_rescale if preview.cfg_rescale is not None else default_cfg_rescale(model.zero_terminal_snr)
    size = preview.size or recipe.data.resolution
    prompts = preview.prompts

    def row() -> list:
        with torch.no_grad(), accelerator.autocast():
            return generate(pipe, prompts, sampler, preview.steps, preview.cfg, rescale, [preview.seed] * len(prompts), (size, size))

    was_training = unet.training
    unet.eval()
    rows = [row()]
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
        rows.append(row())
        ema.restore(params)
    unet.train(was_training)
    for module, home in homes.items():
        module.to(home)
    training_state.restore_rng(rng)
    image = grid.draw_grid(rows, prompts, ["raw", "EMA"] if ema is not None else [])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = atomic.write_bytes(out_dir / "previews" / f"step-{step:06d}.png", buffer.getvalue())
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("preview", np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({"preview": [image]}, step=step)
    return path


def _merge_first(parts, path: str, weight: float) -> None:
    """Merge an earlier LoRA into the base before training a new one on top. The
    text encoder's identity changes with it, so its cache entries are its own."""
    from sdtune.export.kohya import merge_lora, read_lora
    from sdtune.models import file_sha256

    tensors, _ = read_lora(path)
    merge_lora(tensors, parts.unet, parts.text_encoder, weight)
    digest = file_sha256(Path(path))
    if any(key.startswith("lora_te_") for key in tensors):
        parts.text_encoder_sha256 = hashlib.sha256(f"{parts.text_encoder_sha256}+{digest}@{weight}".encode()).hexdigest()
    parts.merged_first = f"{Path(path).name} sha256={digest} weight={weight}"


def _network_args(lora) -> dict[str, str]:
    """kohya's ss_network_args: conv_dim/conv_alpha when 3x3 convolutions are adapted."""
    if lora.preset not in ("locon", "custom") or (lora.conv_rank is None and lora.conv_alpha is None):
        return {}
    return {"conv_dim": str(lora.conv_rank or lora.rank), "conv_alpha": str(lora.conv_alpha or lora.alpha)}


def _trainable(models: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": p for prefix, m in models.items() for name, p in m.named_parameters() if p.requires_grad}


def _save_checkpoint(out_dir, position, models, optimizer, lr_scheduler, ema, accelerator, recipe, params) -> Path | None:
    """All processes call it; the main one writes. Refuses to save non-finite weights."""
    if not all(torch.isfinite(p).all() for p in params):
        raise FloatingPointError(f"non-finite weights at step {position.step}; no checkpoint written. {NAN_ADVICE}")
    states = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": training_state.rng_states(),
    }
    if ema is not None:
        states["ema"] = ema.state_dict()
    if accelerator.scaler is not None:
        states["scaler"] = accelerator.scaler.state_dict()
    saved = None
    if accelerator.is_main_process:
        saved = training_state.save_checkpoint(
            out_dir, position, _trainable(models), states, recipe.to_json(), recipe.checkpoint.keep_last
        )
    accelerator.wait_for_everyone()
    return saved


def _resume(path: Path, recipe: Recipe, models: dict, optimizer, lr_scheduler, ema, accelerator) -> training_state.Position:
    position, trainable, states, saved_recipe = training_state.load_checkpoint(path)
    # Lengthening a run or changing how it is saved is fine; anything else would
    # silently train a different model than the checkpoint's.
    changes = training_state.recipe_changes(
        saved_recipe, recipe.model_dump(mode="json"), ("train.max_steps", "train.log_every", "checkpoint", "output", "data.num_workers")
    )
    if changes:
        raise ValueError(f"the recipe differs from the checkpoint's ({path}):\n  " + "\n  ".join(changes))
    current = _trainable(models)
    if current.keys() != trainable.keys():
        raise ValueError(f"checkpoint {path} holds other trainable weights than this recipe creates")
    with torch.no_grad():
        for name, value in trainable.items():
            current[name].copy_(value)
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(states["ema"])
    if accelerator.scaler is not None and "scaler" in states:
        accelerator.scaler.load_state_dict(states["scaler"])
    training_state.restore_rng(states["rng"])
    accelerator.step = position.micro_steps
    return position


def _batches(loader, order: BucketBatchSampler, position: training_state.Position, device: torch.device):
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


def _floats(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).float().cpu().tolist() if losses else []




def plan_data(data: DataSection, seed: int, tokenizer=None) -> DataPlan:
    """The recipe's data section as a scanned, bucketed plan (also `sdtune data` and `sdtune cache`)."""
    if data.sources:
        sources = [Source(**{**s.model_dump(), "caption_extensions": tuple(s.caption_extensions)}) for s in data.sources]
    else:
        sources = [Source(data.path)]
    spec = BucketSpec(data.resolution, data.bucket_step, data.bucket_min_side, data.bucket_max_side, data.max_aspect_ratio)
    return plan_dataset(
        sources,
        spec,
        missing_caption=data.missing_caption,
        on_bad_image=data.on_bad_image,
        max_upscale=data.max_upscale,
        crop=data.crop,
        flip=data.flip,
        validation_split=data.validation_split,
        split_seed=data.split_seed,
        seed=seed,
        tokenizer=tokenizer,
    )


def _flat(tree: dict, prefix: str = "") -> dict:
    """Recipe as flat scalars, which is what TensorBoard's hparams accept."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdtune train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(DEMO_RECIPE), help="recipe YAML (default: the tiny demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. train.learning_rate=5e-5")
    parser.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint of this output.dir, or from a checkpoint folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    return train(load_recipe(args.recipe, args.overrides), resume=args.resume)


if __name__ == "__main__":
    from sdtune.cli import _run

    sys.exit(_run(lambda: main(sys.argv[1:])))
