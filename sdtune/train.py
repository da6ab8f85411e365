"""Fine-tune a Stable Diffusion 1.x/2.x or SDXL UNet (LoRA or full) from a recipe.

    accelerate launch sdtune/train.py --recipe recipes/lora_vpred.yaml [--set train.max_steps=500]

The whole run reads top to bottom in ``train``: scan the data, load the base
model, fill the latent (and text) caches, set up what is trained, run the loop,
write the results. Only ``train`` reads the recipe; everything it calls takes
plain values.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:
    # Run as a file (`accelerate launch sdtune/train.py`): import the package from
    # the checkout, and keep sdtune/ itself off the path so its module names
    # cannot shadow installed ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import sdtune  # noqa: F401  (before the libraries: it quiets their notices at their loggers)

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sdtune import training_state, zero
from sdtune.compute import make_accelerator
from sdtune.data.cache import (
    CacheStats,
    cached_datasets,
    default_cache_dir,
    fill_caches,
)
from sdtune.data.class_images import fill_class_folders
from sdtune.data.plan import plan_data
from sdtune.diffusion import Objective, reseed
from sdtune.errors import run_command, take_debug_flag
from sdtune.evaluation import preview_grid, save_preview, validation_loss
from sdtune.export.kohya import check_sd2_text_encoder_targets
from sdtune.export.results import ResultSpec, result_paths
from sdtune.loop import StepSetup, all_finite, batch_loss, make_loader, skip_batch
from sdtune.loop import batches as data_order
from sdtune.models import DTYPES, load_components
from sdtune.optim import make_lr_scheduler, make_optimizer
from sdtune.outputs import RunFolder
from sdtune.recipe import Recipe, load_recipe
from sdtune.run_report import (
    NAN_ADVICE,
    announce,
    finish,
    flat_config,
    floats,
    keep_step_exports,
    log_losses,
    print_resume,
    warn_unchanged_layers,
)
from sdtune.samplers import default_cfg_rescale, make_sampler, sampling_config
from sdtune.sharded import ModelView, clip_gradients, stored_dtype
from sdtune.sdxl import text_encoders
from sdtune.textual_inversion import add_embedding
from sdtune.tiny import clip_tokenizer
from sdtune.trainable import (
    make_trainable,
    merge_first,
    network_args,
    place_encoders,
    prepare_models,
    write_result_with_ema,
)

DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny_demo.yaml"  # shipped with the package


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
    accelerator = make_accelerator(opt.mixed_precision, opt.gradient_accumulation_steps, opt.logger, out_dir, opt.seed, opt.deterministic,
                                   opt.compile)  # an impossible precision, or precision and compile pair, stops here
    device, weight_dtype, is_main = accelerator.device, stored_dtype(accelerator, DTYPES[opt.mixed_precision]), accelerator.is_local_main_process
    train_te = recipe.trains_text_encoder

    # The scan, before the model loads (DreamBooth class images a folder lacks are drawn first): every file
    # is checked and bucketed; problems stop the run here with the full list, or are skipped (data.on_bad_image).
    fill_class_folders(data.sources, model.path, model.allow_pickle, data.resolution, opt.seed, accelerator)
    plan = plan_data(data, opt.seed, clip_tokenizer())  # SD 1 and 2 share the BPE: token counts need no model
    parts = load_components(model.path, model.prediction_type, model.zero_terminal_snr,
                            weight_dtype if opt.method != "full" else torch.float32, model.allow_pickle,  # full: fp32 master weights
                            opt.seed if model.init == "random" else None)
    if train_te:
        check_sd2_text_encoder_targets(lora.text_encoder_target_modules, parts.base_model_version)
    if lora.merge_first:
        merge_first(parts, lora.merge_first, lora.merge_first_weight, model.allow_pickle)
    plan = add_embedding(parts, plan, **recipe.embedding.model_dump()) if opt.method == "textual_inversion" else plan  # the new word's rows
    if accelerator.is_main_process:
        announce(plan, parts.name, parts.base_model_version, folder, folder.claim(out.overwrite, resume_run), opt.logger,
                  (opt.batch_size, accelerator.num_processes, opt.gradient_accumulation_steps))

    # Caches: each process encodes its share of what is missing (held-out images too, for
    # validation); the frozen encoders leave the device once they are built.
    caches = fill_caches(plan, parts, Path(data.cache_dir) if data.cache_dir else default_cache_dir(), accelerator, recipe.caches_text)
    text_in_loop = caches.text is None  # the text encoder trains, or shuffled tags make new captions each epoch
    dataset, val_dataset, empty_conditioning = cached_datasets(plan, caches, parts, data.shuffle_tags, data.keep_tokens, opt.seed, opt.prior_loss_weight)
    empty_conditioning = {k: v.to(device) for k, v in empty_conditioning.items()}  # caption dropout mixes it into batches on the device
    scaling = place_encoders(parts, device, weight_dtype, frozen_in_loop=text_in_loop and not train_te, trains=train_te,
                              needed_later=bool(preview.prompts) or opt.method == "full")  # previews draw; a full result holds them
    unet, text_encoder = parts.unet, text_encoders(parts)  # SDXL's two encoders as one module
    groups = make_trainable(unet, text_encoder if train_te else None, opt.method, lora, opt.attention, opt.gradient_checkpointing,
                             opt.learning_rate, opt.text_encoder_learning_rate, device, weight_dtype)
    optimizer = make_optimizer(groups, opt.optimizer, (opt.adam_beta1, opt.adam_beta2), opt.adam_weight_decay, opt.adam_epsilon)
    lr_scheduler = make_lr_scheduler(  # the prepared scheduler steps once per process per optimizer step
        optimizer, opt.lr_scheduler, opt.lr_warmup_steps * accelerator.num_processes,
        opt.max_steps * accelerator.num_processes, opt.lr_num_cycles, opt.lr_power)
    order, loader = make_loader(dataset, [i.crop.bucket for i in plan.train], opt.batch_size, opt.seed, data.num_workers, accelerator)
    view = ModelView({"unet": unet} | ({"text_encoder": text_encoder} if train_te else {}), optimizer, accelerator,  # whole models, FSDP too
                     zero.Settings(opt.batch_size, opt.gradient_accumulation_steps, opt.max_grad_norm, recipe.ema.enabled))
    *trained, optimizer, lr_scheduler = prepare_models(accelerator, list(view.models.values()), optimizer, lr_scheduler)  # a frozen UNet is not wrapped
    unet, encoder = trained[0], trained[1] if train_te else text_encoder  # what the loop runs
    models, params = view.attach(trained, lr_scheduler)
    step_unet = torch.compile(unet, backend="inductor" if opt.compile is True else opt.compile) if opt.compile else unet  # steps only
    scheduler = parts.noise_scheduler
    setup = StepSetup(scheduler, Objective(opt.min_snr_gamma, opt.debiased_estimation, opt.loss_type, opt.huber_c), scaling,
                      opt.min_timestep, opt.max_timestep or scheduler.config.num_train_timesteps, opt.timestep_sampling,
                      opt.logit_mean, opt.logit_std, opt.noise_offset, opt.noise_offset_random_strength, opt.input_perturbation,
                      empty_conditioning, data.caption_dropout)
    ema = EMAModel(params, decay=recipe.ema.decay, use_ema_warmup=recipe.ema.warmup, inv_gamma=1.0, power=2 / 3) if recipe.ema.enabled else None
    preview_schedule = sampling_config(scheduler.config, model.prediction_type, model.zero_terminal_snr)
    if preview.prompts:
        make_sampler(preview.sampler, preview_schedule)  # a sampler that cannot run this model fails now, not at step 100
    cfg_rescale = preview.cfg_rescale if preview.cfg_rescale is not None else default_cfg_rescale(model.zero_terminal_snr)
    position, history = training_state.start_or_resume(resume_from, recipe.model_dump(mode="json"), view, ema, accelerator)
    if accelerator.is_main_process:
        accelerator.init_trackers(out.name, config=flat_config(recipe.model_dump(mode="json")))
    spec = ResultSpec(
        method=opt.method, formats=tuple(recipe.export.formats), dtype=DTYPES[recipe.export.dtype],
        prediction_type=model.prediction_type, zero_terminal_snr=model.zero_terminal_snr, title=out.name,
        recipe_json=recipe.to_json(), rank=lora.rank, alpha=lora.alpha, network_args=network_args(lora),
        resolution=data.resolution, learning_rate=opt.learning_rate, seed=opt.seed)

    # The loop. Per step only the UNet (and TE) forward/backward and the optimizer
    # cost time; the host syncs only at log intervals (and every step with
    # train.on_nan: skip, which must look at each loss).
    losses, history = [], {key: history.get(key, []) for key in ("loss", "lr", "validation", "previews")}  # report.html's
    history["validation"] = validation = [(s, {int(t): v for t, v in per_t.items()}) for s, per_t in history["validation"]]  # JSON keys back to ints
    step, skipped, started, stopped_by, saved = position.step, 0, time.perf_counter(), None, None
    bar = tqdm(total=opt.max_steps, initial=step, desc="training", unit="step", disable=not is_main)
    batches, generator = data_order(loader, order, position, device), torch.Generator(device)
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
                loss = batch_loss(step_unet, encoder if text_in_loop else None, batch, setup, te_trains, keyed)
                if opt.on_nan == "skip" and not all_finite(loss, accelerator):  # all processes skip it, or none
                    skipped = skip_batch(skipped, step, optimizer)
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients and opt.max_grad_norm > 0:
                    clip_gradients(accelerator, params, opt.max_grad_norm)
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
                log_losses(losses[-opt.log_every * opt.gradient_accumulation_steps :], lr_scheduler.get_last_lr()[0], step, bar, accelerator, history)
            if len(val_dataset) and (step % recipe.validation.every_steps == 0 or step == opt.max_steps):
                per_t = validation_loss(unet, encoder if text_in_loop else None, scheduler, scaling, val_dataset,
                                        recipe.validation.timesteps, recipe.validation.seed, device)
                validation.append((step, per_t))
                accelerator.log({"val/loss": sum(per_t.values()) / len(per_t)} | {f"val/loss_t{t}": v for t, v in per_t.items()}, step=step)
            if preview.prompts and (step % preview.every_steps == 0 or step == opt.max_steps) and (drawn := view.for_preview(ema, params))[0]:
                image = preview_grid(parts, drawn[0]["unet"], drawn[0].get("text_encoder", text_encoder), make_sampler(preview.sampler, preview_schedule),
                                     preview.prompts, preview.steps, preview.cfg, cfg_rescale, preview.seed,
                                     preview.size or data.resolution, device, view.autocast, drawn[1], params,
                                     base_row=preview.base_row and opt.method == "lora")
                history["previews"].append((step, str(save_preview(image, folder, step, accelerator.trackers))))
            due = (ckpt.every_steps and step % ckpt.every_steps == 0) or (
                ckpt.every_epochs and batch_in_epoch == len(loader) and (epoch + 1) % ckpt.every_epochs == 0)
            if (due and step < opt.max_steps) or signalled is not None:
                here = training_state.Position(step, epoch, batch_in_epoch, accelerator.step, folder.record.run_id if folder.record else "",
                                               accelerator.num_processes)
                saved, kept = training_state.save_state(folder.checkpoints, here, view, ema, accelerator,
                                                        recipe.to_json(), ckpt.keep_last, params, NAN_ADVICE, history)
                written = write_result_with_ema(folder.step_stem(step), spec, view, ema, params, parts, step, plan.images) if ckpt.export else []
                if accelerator.is_main_process:
                    keep_step_exports(folder, kept, written)
                if signalled is not None:
                    stopped_by = signalled
                    break
    bar.close()
    accelerator.wait_for_everyone()
    written = write_result_with_ema(folder.stem, spec, view, ema, params, parts, step, plan.images) if stopped_by is None else []
    models = view.skeletons or models  # under FSDP (main process): the weights just written, gathered
    result = TrainResult(results[0], floats(losses), caches.latent_stats, caches.text_stats, models["unet"],
                         models.get("text_encoder", text_encoder), step, stopped_by, validation)
    if stopped_by is None and accelerator.is_main_process:  # the results
        if opt.method == "lora":
            warn_unchanged_layers(written[0])
        finish(written, folder, recipe.to_yaml(), parts, model.prediction_type, model.zero_terminal_snr,
                plan.images, step, step - position.step, time.perf_counter() - started, skipped, history)
    elif accelerator.is_main_process:
        folder.set_status("stopped", step)
        print_resume(stopped_by, step, saved)
    accelerator.end_training()
    if ema is not None and stopped_by is None:
        ema.copy_to(params)  # callers get the model that was exported
    return result



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
