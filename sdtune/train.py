"""Fine-tune a Stable Diffusion 1.x/2.x or SDXL UNet (LoRA or full) from a recipe.

    accelerate launch sdtune/train.py --recipe recipes/lora_vpred.yaml [--set train.max_steps=500]

The whole run reads top to bottom in ``train``: scan the data, load the base
model, fill the latent (and text) caches, set up what is trained, run the loop,
write the results. Only ``train`` reads the recipe; everything it calls takes
plain values.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
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

import torch
from diffusers.training_utils import EMAModel, cast_training_params
from tqdm.auto import tqdm

import sdtune  # noqa: F401  (first: it quiets library notices before the libraries load)
from sdtune import atomic, training_state
from sdtune.adapters import add_lora, trainable_parameters
from sdtune.compute import highest_on_any_process, make_accelerator
from sdtune.conditioning import unet_conditioning
from sdtune.data.buckets import BucketBatchSampler
from sdtune.data.cache import CacheStats, cached_datasets, default_cache_dir, fill_caches
from sdtune.data.captions import drop_caption_parts
from sdtune.data.plan import DataPlan, plan_data, skipped_report, warnings_for
from sdtune.diffusion import (
    Objective,
    denoising_loss,
    perturb_noise,
    reseed,
    sample_latents,
    sample_noise,
    sample_timesteps,
)
from sdtune.errors import run_command, take_debug_flag
from sdtune.evaluation import preview_grid, save_preview, validation_loss
from sdtune.export.kohya import check_sd2_text_encoder_targets
from sdtune.export.results import ResultSpec, result_paths, write_result
from sdtune.models import DTYPES, load_components, set_attention
from sdtune.optim import make_lr_scheduler, make_optimizer
from sdtune.outputs import RunFolder
from sdtune.recipe import Recipe, load_recipe
from sdtune.report import render_report
from sdtune.samplers import default_cfg_rescale, make_sampler, sampling_config
from sdtune.sdxl import SdxlComponents, text_encoders, unused_text_encoder_modules
from sdtune.tiny import clip_tokenizer

DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny_demo.yaml"  # shipped with the package
MAX_SKIPPED_BATCHES = 20
NAN_ADVICE = "Likely causes: train.learning_rate too high, or fp16 overflow (try bf16)"


@dataclass
class TrainResult:
    output: Path  # the LoRA file, or a full fine-tune's single file (its diffusers folder when that is the only format)
    losses: list[float]  # one per micro-batch
    latent_cache: CacheStats
    text_cache: CacheStats | None  # None when the text encoder runs in the loop (it trains, or tags are shuffled)
    unet: torch.nn.Module  # as trained (with its LoRA layers), for callers that go on using it
    text_encoder: torch.nn.Module | None  # None: frozen, unused after caching, and freed (SDXL: sdxl.SdxlTextEncoders)
    steps: int  # optimizer steps done when the run ended
    stopped_by: int | None = None  # the signal that interrupted the run (state saved), else None
    validation: list[tuple[int, dict[int, float]]] = field(default_factory=list)  # (step, {timestep: loss})


def train(recipe: Recipe, resume: str | None = None) -> TrainResult:
    model, data, lora, opt, out, ckpt = recipe.model, recipe.data, recipe.lora, recipe.train, recipe.output, recipe.checkpoint
    preview, folder = recipe.preview, RunFolder(out.dir, out.name)  # what this run may write, and its record
    out_dir, results = folder.dir, result_paths(folder.stem, opt.method, tuple(recipe.export.formats))
    resume_from = training_state.resolve(resume, folder.checkpoints) if resume else None
    resume_run = training_state.run_of(resume_from) if resume_from else None
    folder.check(out.overwrite, resume_run)  # another run's files are never replaced silently
    accelerator = make_accelerator(opt.mixed_precision, opt.gradient_accumulation_steps, opt.logger, out_dir, opt.seed, opt.deterministic)
    device, weight_dtype, is_main = accelerator.device, DTYPES[opt.mixed_precision], accelerator.is_local_main_process
    train_te = recipe.trains_text_encoder

    # The scan, before the model loads: every file is checked and bucketed; problems stop
    # the run here with the full list, or are skipped and written down (data.on_bad_image).
    plan = plan_data(data, opt.seed, clip_tokenizer())  # SD 1 and 2 share the BPE: token counts need no model
    parts = load_components(model.path, model.prediction_type, model.zero_terminal_snr,
                            weight_dtype if opt.method == "lora" else torch.float32, model.allow_pickle)  # full: fp32 master weights
    if train_te:
        check_sd2_text_encoder_targets(lora.text_encoder_target_modules, parts.base_model_version)
    if lora.merge_first:
        _merge_first(parts, lora.merge_first, lora.merge_first_weight, model.allow_pickle)
    if accelerator.is_main_process:
        _announce(plan, parts.name, parts.base_model_version, folder, folder.claim(out.overwrite, resume_run), opt.logger,
                  (opt.batch_size, accelerator.num_processes, opt.gradient_accumulation_steps))

    # Caches: each process encodes its share of what is missing (held-out images too, for
    # validation); the frozen encoders leave the device once they are built.
    caches = fill_caches(plan, parts, Path(data.cache_dir) if data.cache_dir else default_cache_dir(), accelerator, recipe.caches_text)
    text_in_loop = caches.text is None  # the text encoder trains, or shuffled tags make new captions each epoch
    dataset, val_dataset, empty_conditioning = cached_datasets(plan, caches, parts, data.shuffle_tags, data.keep_tokens, opt.seed)
    empty_conditioning = {k: v.to(device) for k, v in empty_conditioning.items()}  # caption dropout mixes it into batches on the device
    scaling = _place_encoders(parts, device, weight_dtype, frozen_in_loop=text_in_loop and not train_te, trains=train_te,
                              needed_later=bool(preview.prompts) or opt.method == "full")  # previews draw; a full result holds them
    unet, text_encoder = parts.unet, text_encoders(parts)  # SDXL's two encoders as one module
    groups = _make_trainable(unet, text_encoder if train_te else None, opt.method, lora, opt.attention, opt.gradient_checkpointing,
                             opt.learning_rate, opt.text_encoder_learning_rate, device, weight_dtype)
    optimizer = make_optimizer(groups, opt.optimizer, (opt.adam_beta1, opt.adam_beta2), opt.adam_weight_decay, opt.adam_epsilon)
    lr_scheduler = make_lr_scheduler(  # the prepared scheduler steps once per process per optimizer step
        optimizer, opt.lr_scheduler, opt.lr_warmup_steps * accelerator.num_processes,
        opt.max_steps * accelerator.num_processes, opt.lr_num_cycles, opt.lr_power)
    order, loader = _loader(dataset, [i.crop.bucket for i in plan.train], opt.batch_size, opt.seed, data.num_workers, accelerator)
    trained = [unet, text_encoder] if train_te else [unet]
    *trained, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    unet, encoder = trained[0], trained[1] if train_te else text_encoder  # what the loop runs
    models = {"unet": accelerator.unwrap_model(unet)} | ({"text_encoder": accelerator.unwrap_model(trained[1])} if train_te else {})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler, objective = parts.noise_scheduler, Objective(opt.min_snr_gamma, opt.debiased_estimation, opt.loss_type, opt.huber_c)
    t_low, t_high = opt.min_timestep, opt.max_timestep or scheduler.config.num_train_timesteps
    ema = EMAModel(params, decay=recipe.ema.decay, use_ema_warmup=recipe.ema.warmup, inv_gamma=1.0, power=2 / 3) if recipe.ema.enabled else None
    preview_schedule = sampling_config(scheduler.config, model.prediction_type, model.zero_terminal_snr)
    if preview.prompts:
        make_sampler(preview.sampler, preview_schedule)  # a sampler that cannot run this model fails now, not at step 100
    cfg_rescale = preview.cfg_rescale if preview.cfg_rescale is not None else default_cfg_rescale(model.zero_terminal_snr)
    position, history = training_state.Position(step=0, epoch=0, batch_in_epoch=0, micro_steps=0), {}
    if resume_from is not None:
        position, history = training_state.resume_state(resume_from, recipe.model_dump(mode="json"), models, ema, accelerator)
        if is_main:
            print(f"sdtune: resumed from {resume_from} at step {position.step}")
    if accelerator.is_main_process:
        accelerator.init_trackers(out.name, config=_flat(recipe.model_dump(mode="json")))
    spec = ResultSpec(
        method=opt.method, formats=tuple(recipe.export.formats), dtype=DTYPES[recipe.export.dtype],
        prediction_type=model.prediction_type, zero_terminal_snr=model.zero_terminal_snr, title=out.name,
        recipe_json=recipe.to_json(), rank=lora.rank, alpha=lora.alpha, network_args=_network_args(lora),
        resolution=data.resolution, learning_rate=opt.learning_rate, seed=opt.seed)

    # The loop. Per step only the UNet (and TE) forward/backward and the optimizer
    # cost time; the host syncs only at log intervals (and every step with
    # train.on_nan: skip, which must look at each loss).
    losses, history = [], {key: history.get(key, []) for key in ("loss", "lr", "validation", "previews")}  # report.html's
    history["validation"] = validation = [(s, {int(t): v for t, v in per_t.items()}) for s, per_t in history["validation"]]  # JSON keys back to ints
    step, skipped, started, stopped_by, saved = position.step, 0, time.perf_counter(), None, None
    bar = tqdm(total=opt.max_steps, initial=step, desc="training", unit="step", disable=not is_main)
    batches, generator = _batches(loader, order, position, device), torch.Generator(device)
    for module in trained:
        module.train()
    with training_state.StopOnSignal() as stop:
        while step < opt.max_steps:
            epoch, batch_in_epoch, batch = next(batches)
            # A batch's randomness is keyed by its place in the data order, not by the process
            # that draws it: the same order trains the same model on any number of processes.
            keyed = reseed(generator, opt.seed, epoch, order.global_index(batch_in_epoch - 1))
            te_trains = train_te and (opt.text_encoder_steps is None or step < opt.text_encoder_steps)
            with accelerator.accumulate(*trained):
                conditioning, added = _conditioning(batch, encoder if text_in_loop else None, te_trains, empty_conditioning, data.caption_dropout, keyed)
                latents = sample_latents(batch["mean"], batch["std"], scaling, keyed)
                noise = sample_noise(latents, opt.noise_offset, opt.noise_offset_random_strength, keyed)
                timesteps = sample_timesteps(latents.shape[0], device, t_low, t_high, opt.timestep_sampling, opt.logit_mean, opt.logit_std, keyed)
                input_noise = perturb_noise(noise, opt.input_perturbation, keyed) if opt.input_perturbation else None
                loss = denoising_loss(unet, scheduler, latents, conditioning, noise, timesteps, objective, input_noise, **added)
                if opt.on_nan == "skip" and not _all_finite(loss, accelerator):  # all processes skip it, or none
                    skipped = _skip_batch(skipped, step, optimizer)
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
            signalled = stop.agreed(accelerator)  # every process stops at this step, or none
            if ema is not None and step % recipe.ema.update_every == 0:
                ema.step(params)
            if step % opt.log_every == 0 or step == opt.max_steps:
                _log(losses[-opt.log_every * opt.gradient_accumulation_steps :], lr_scheduler.get_last_lr()[0], step, bar, accelerator, history)
            if len(val_dataset) and (step % recipe.validation.every_steps == 0 or step == opt.max_steps):
                per_t = validation_loss(unet, encoder if text_in_loop else None, scheduler, scaling, val_dataset,
                                        recipe.validation.timesteps, recipe.validation.seed, device)
                validation.append((step, per_t))
                accelerator.log({"val/loss": sum(per_t.values()) / len(per_t)} | {f"val/loss_t{t}": v for t, v in per_t.items()}, step=step)
            if preview.prompts and accelerator.is_main_process and (step % preview.every_steps == 0 or step == opt.max_steps):
                image = preview_grid(parts, models["unet"], models.get("text_encoder", text_encoder), make_sampler(preview.sampler, preview_schedule),
                                     preview.prompts, preview.steps, preview.cfg, cfg_rescale, preview.seed,
                                     preview.size or data.resolution, device, accelerator.autocast, ema, params)
                history["previews"].append((step, str(save_preview(image, folder, step, accelerator.trackers))))
            due = (ckpt.every_steps and step % ckpt.every_steps == 0) or (
                ckpt.every_epochs and batch_in_epoch == len(loader) and (epoch + 1) % ckpt.every_epochs == 0)
            if (due and step < opt.max_steps) or signalled is not None:
                here = training_state.Position(step, epoch, batch_in_epoch, accelerator.step, folder.record.run_id if folder.record else "",
                                               accelerator.num_processes)
                saved, kept = training_state.save_state(folder.checkpoints, here, models, ema, accelerator,
                                                        recipe.to_json(), ckpt.keep_last, params, NAN_ADVICE, history)
                if accelerator.is_main_process:
                    written = _write_result(folder.step_stem(step), spec, models, ema, params, parts, step, plan.images) if ckpt.export else []
                    _keep_step_exports(folder, kept, written)
                if signalled is not None:
                    stopped_by = signalled
                    break
    bar.close()
    accelerator.wait_for_everyone()
    result = TrainResult(results[0], _floats(losses), caches.latent_stats, caches.text_stats, models["unet"],
                         models.get("text_encoder", text_encoder), step, stopped_by, validation)
    if stopped_by is None and accelerator.is_main_process:  # the results
        written = _write_result(folder.stem, spec, models, ema, params, parts, step, plan.images)
        if opt.method == "lora":
            _warn_unchanged_layers(written[0])
        _finish(written, folder, recipe.to_yaml(), parts, model.prediction_type, model.zero_terminal_snr,
                plan.images, step, step - position.step, time.perf_counter() - started, skipped, history)
    elif accelerator.is_main_process:
        folder.set_status("stopped", step)
        _print_resume(stopped_by, step, saved)
    accelerator.end_training()
    if ema is not None and stopped_by is None:
        ema.copy_to(params)  # callers get the model that was exported
    return result


def _place_encoders(parts, device: torch.device, weight_dtype: torch.dtype, frozen_in_loop: bool, trains: bool,
                    needed_later: bool) -> float:
    """After caching: the VAE leaves the device; the text encoder too, unless it runs in the
    loop. Unless previews or a full fine-tune's result need them later, both are freed
    (SD 1.5: 0.8 GB of fp32 weights the training steps never touch). Returns the VAE's
    latent scaling factor, which the loop needs."""
    scaling = parts.vae.config.scaling_factor
    if needed_later:
        parts.vae.to("cpu")
    else:
        parts.vae = None
    for name in ("text_encoder", "text_encoder_2") if isinstance(parts, SdxlComponents) else ("text_encoder",):
        if frozen_in_loop:
            getattr(parts, name).requires_grad_(False).to(device, dtype=weight_dtype)
        elif not trains and needed_later:
            getattr(parts, name).to("cpu")
        elif not trains:
            setattr(parts, name, None)
    gc.collect()
    return scaling


def _loader(dataset, buckets: list[tuple[int, int]], batch_size: int, seed: int, num_workers: int, accelerator):
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


def _conditioning(batch: dict, encoder, trains: bool, empty: dict, dropout: float, generator) -> tuple[torch.Tensor, dict]:
    """The UNet's conditioning for ``batch`` and its other keyword arguments (SDXL's pooled
    embedding and size/crop ids), some captions dropped, every part of a caption together
    (``empty``: the empty caption's parts): cached, or from ``encoder`` when it runs in the
    loop (with gradients only while it ``trains``: after train.text_encoder_steps it runs
    without, so it gets none and AdamW leaves it be)."""
    text = drop_caption_parts({key: batch[key] for key in empty}, empty, dropout, generator)
    with contextlib.nullcontext() if trains or encoder is None else torch.no_grad():
        return unet_conditioning(text, encoder, batch.get("time_ids"))


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (a batch is skipped by all, or by none)."""
    return not highest_on_any_process(int(not torch.isfinite(loss).all().item()), accelerator)


def _skip_batch(skipped: int, step: int, optimizer) -> int:
    """train.on_nan: skip drops a batch whose loss is not finite, up to a limit."""
    skipped += 1
    if skipped > MAX_SKIPPED_BATCHES:
        raise FloatingPointError(f"{skipped} batches had a non-finite loss by step {step}; {NAN_ADVICE}")
    optimizer.zero_grad(set_to_none=True)
    return skipped


def _log(recent_losses: list[torch.Tensor], lr: float, step: int, bar, accelerator, history: dict) -> None:
    """The mean loss since the last log (the loop's one host sync), to the bar, the trackers and report.html."""
    recent = accelerator.reduce(torch.stack(recent_losses).mean(), "mean").item()  # over all processes
    if not math.isfinite(recent):
        raise FloatingPointError(f"loss is {recent} at step {step}; nothing was written. {NAN_ADVICE}")
    bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": recent, "train/lr": lr}, step=step)
    history["loss"].append((step, recent))
    history["lr"].append((step, lr))


def _finish(written, folder: RunFolder, recipe_yaml: str, parts, prediction_type: str, zero_terminal_snr: bool,
            images: int, step: int, steps: int, elapsed: float, skipped: int, history: dict) -> None:
    """The resolved recipe and report.html beside the results, the run recorded as finished, and where everything is."""
    folder.add(*written, atomic.write_text(folder.recipe, recipe_yaml))
    summary = {"base model": f"{parts.name} ({parts.base_model_version}, {prediction_type}"
               f"{', zero terminal SNR' if zero_terminal_snr else ''})", "steps": str(step),
               "images": str(images), "outputs": ", ".join(str(p) for p in written)}
    previews, validation = [(s, Path(p)) for s, p in history["previews"] if Path(p).is_file()], history["validation"]
    folder.add(atomic.write_text(folder.report, render_report(folder.name, summary, history, validation, previews, recipe_yaml)))
    folder.set_status("finished", step)
    if skipped:
        print(f"sdtune: skipped {skipped} batches with a non-finite loss")
    if validation:
        print(f"sdtune: validation loss {sum(validation[-1][1].values()) / len(validation[-1][1]):.4f} at step {validation[-1][0]}")
    print(f"sdtune: trained {steps} steps in {elapsed:.1f}s ({steps / elapsed:.2f} steps/s)")
    for path in [*written, folder.report]:
        print(f"sdtune: wrote {path}")
    print(f"sdtune: recipe {folder.recipe}; logs {folder.dir / 'logs' / folder.name}")


def _warn_unchanged_layers(lora_file: Path) -> None:
    """Layers that got no gradient are exported as zeros: say so, as `sdtune inspect` would."""
    from sdtune.export.inspect import zero_update_layers
    from sdtune.export.kohya import read_lora

    tensors = read_lora(lora_file)[0]
    unchanged = zero_update_layers(tensors)
    if unchanged:
        total = len({k.split(".", 1)[0] for k in tensors})
        print(f"sdtune: warning: {len(unchanged)} of {total} LoRA layers change nothing (their update is exactly zero: "
              f"no gradient reached them), e.g. {', '.join(unchanged[:2])}; `sdtune inspect {lora_file}` lists them", file=sys.stderr)


def _print_resume(signal: int, step: int, saved: Path | None) -> None:
    print(f"sdtune: stopped by signal {signal} after step {step}; state saved to {saved}")
    print("sdtune: resume with the same command plus --resume latest:")
    print("  " + " ".join(shlex.quote(a) for a in [sys.executable, *_without_resume(sys.argv), "--resume", "latest"]))


def _without_resume(argv: list[str]) -> list[str]:
    """``argv`` less any ``--resume X`` / ``--resume=X`` it already had (a resumed run stopped again)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return kept


def _announce(plan: DataPlan, model_name: str, base_model_version: str, folder: RunFolder, claimed: list[str], logger: str,
              batch: tuple[int, int, int]) -> None:
    """What the run trains on and where it writes (main process), once it owns its files;
    ``batch``: (per-process batch, processes, accumulation steps)."""
    for line in claimed:
        print(f"sdtune: {line}", file=sys.stderr)
    print(f"sdtune: {plan.images} images ({len(plan.train)} per epoch) from {', '.join(plan.sources)}; base {model_name} ({base_model_version})")
    print(f"sdtune: effective batch {math.prod(batch)} = batch {batch[0]} x {batch[1]} process(es) x {batch[2]} accumulation step(s)")
    for line in warnings_for(plan):
        print(f"sdtune: {line}", file=sys.stderr)
    if plan.skipped:
        folder.add(atomic.write_text(folder.skipped, skipped_report(plan)))
    folder.add(folder.checkpoints, *([folder.dir / "logs" / folder.name] if logger != "none" else []))


def _keep_step_exports(folder: RunFolder, kept: list[Path], written: list[Path]) -> None:
    """Record a step export, and keep only those of the kept checkpoints (checkpoint.keep_last)."""
    folder.add(*written)
    folder.prune_step_exports({int(p.name.removeprefix(training_state.PREFIX)) for p in kept})


def _make_trainable(
    unet, text_encoder, method: str, lora, attention: str, gradient_checkpointing: bool, learning_rate: float,
    text_encoder_learning_rate: float | None, device: torch.device, weight_dtype: torch.dtype,
) -> list[dict]:
    """Put the UNet (and ``text_encoder`` when it trains) on ``device`` with what trains
    switched on: LoRA layers (``lora``: the recipe's LoRA settings) or every weight.
    Frozen weights are stored in the autocast dtype; trainable ones stay fp32 so small
    updates are not rounded away. Returns the optimizer's param groups."""
    set_attention(unet, attention, device)
    unet.to(device)
    if text_encoder is not None:
        text_encoder.to(device)
        if method == "lora":
            text_encoder.to(dtype=weight_dtype)
    if method == "lora":
        add_lora(unet, lora.rank, lora.alpha, lora.dropout, lora.unet_targets(), lora.conv_rank, lora.conv_alpha, lora.init)
        if text_encoder is not None:
            add_lora(text_encoder, lora.rank, lora.alpha, lora.dropout, lora.text_encoder_target_modules, init=lora.init,
                     exclude=unused_text_encoder_modules(text_encoder, lora.sdxl_text_encoders))
            cast_training_params(text_encoder, dtype=torch.float32)
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.requires_grad_(True)
        if text_encoder is not None:
            text_encoder.requires_grad_(True)
            for name in unused_text_encoder_modules(text_encoder):  # no gradient reaches them (DDP would wait for one)
                text_encoder.get_submodule(name).requires_grad_(False)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()
    groups = [{"params": trainable_parameters(unet), "lr": learning_rate}]
    if text_encoder is not None:
        groups.append({"params": trainable_parameters(text_encoder), "lr": text_encoder_learning_rate or learning_rate})
    return groups


def _write_result(stem: Path, spec: ResultSpec, models: dict, ema, params: list, parts, steps: int, num_images: int) -> list[Path]:
    """The result at ``stem``, with the EMA weights when EMA is on; the training weights are left as they were."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        return write_result(stem, spec, models["unet"], models.get("text_encoder"), parts, steps, num_images)
    finally:
        if ema is not None:
            ema.restore(params)


def _merge_first(parts, path: str, weight: float, allow_pickle: bool) -> None:
    """Merge an earlier LoRA into the base before training a new one on top. The
    text encoder's identity changes with it, so its cache entries are its own."""
    from sdtune.export.kohya import merge_lora, read_lora
    from sdtune.hashes import file_sha256

    tensors, _ = read_lora(path, allow_pickle)
    merge_lora(tensors, parts.unet, parts.text_encoder, weight, getattr(parts, "text_encoder_2", None))
    digest = file_sha256(Path(path))
    if any(key.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for key in tensors):
        parts.text_encoder_sha256 = hashlib.sha256(f"{parts.text_encoder_sha256}+{digest}@{weight}".encode()).hexdigest()
    parts.merged_first = f"{Path(path).name} sha256={digest} weight={weight}"


def _network_args(lora) -> dict[str, str]:
    """kohya's ss_network_args: conv_dim/conv_alpha when 3x3 convolutions are adapted."""
    if lora.preset not in ("locon", "custom") or (lora.conv_rank is None and lora.conv_alpha is None):
        return {}
    return {"conv_dim": str(lora.conv_rank or lora.rank), "conv_alpha": str(lora.conv_alpha or lora.alpha)}


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
    args = parse_args(take_debug_flag(sys.argv[1:] if argv is None else list(argv)))
    return train(load_recipe(args.recipe, args.overrides), resume=args.resume)


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
