"""Fine-tune a Stable Diffusion 1.x/2.x UNet (LoRA or full) from a recipe.

    accelerate launch sdtune/train.py --recipe recipes/lora_vpred.yaml [--set train.max_steps=500]

The whole run reads top to bottom in ``train``: load the base model, scan the
data, fill the latent (and text) caches, set up what is trained, run the loop,
write the results. Everything it calls takes plain values, not the recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:
    # Run as a file (`accelerate launch sdtune/train.py`): import the package from
    # the checkout, and keep sdtune/ itself off the path so its module names
    # cannot shadow installed ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from sdtune import atomic
from sdtune.adapters import add_lora, trainable_parameters
from sdtune.data.buckets import BucketBatchSampler
from sdtune.data.cache import CachedDataset, CacheStats, cache_latents, cache_text, default_cache_dir, summed
from sdtune.data.captions import drop_captions, tokenize
from sdtune.data.plan import BucketSpec, DataPlan, plan_dataset, skipped_report, warnings_for
from sdtune.data.sources import Source
from sdtune.diffusion import denoising_loss, sample_latents, sample_noise, sample_timesteps
from sdtune.export.kohya import kohya_state_dict
from sdtune.export.metadata import lora_metadata
from sdtune.models import encode_prompts, load_components, set_attention
from sdtune.recipe import DataSection, Recipe, load_recipe

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny_demo.yaml"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainResult:
    output: Path  # the LoRA file, or the diffusers folder of a full fine-tune
    losses: list[float]  # one per micro-batch
    latent_cache: CacheStats
    text_cache: CacheStats | None  # None when the text encoder runs in the loop (it trains, or tags are shuffled)
    unet: torch.nn.Module  # as trained (with its LoRA layers), for callers that go on using it
    text_encoder: torch.nn.Module


def train(recipe: Recipe) -> TrainResult:
    model, data, lora, opt, out = recipe.model, recipe.data, recipe.lora, recipe.train, recipe.output
    diffusers_logging.disable_progress_bar()  # per-file "Loading weights" bars hide ours
    transformers_logging.disable_progress_bar()
    out_dir = Path(out.dir)
    result_path = out_dir / (f"{out.name}.safetensors" if opt.method == "lora" else out.name)
    if result_path.exists() and not out.overwrite:
        raise FileExistsError(f"{result_path} exists from an earlier run; set output.overwrite=true or another output.name")

    accelerator = Accelerator(
        mixed_precision=opt.mixed_precision,
        gradient_accumulation_steps=opt.gradient_accumulation_steps,
        log_with=None if opt.logger == "none" else opt.logger,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )
    if opt.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    set_seed(opt.seed, device_specific=True)
    is_main = accelerator.is_local_main_process
    device, weight_dtype = accelerator.device, DTYPES[opt.mixed_precision]
    train_te = opt.method == "lora" and lora.text_encoder

    # Base model and data.
    unet_dtype = weight_dtype if opt.method == "lora" else torch.float32  # full: fp32 master weights
    parts = load_components(model.path, model.prediction_type, model.zero_terminal_snr, unet_dtype)
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
    latent_paths = latent_paths[: len(plan.train)]
    text_stats = None
    # Shuffled tags make a new caption each epoch, so the text encoder then runs in the loop.
    text_in_loop = train_te or data.shuffle_tags
    if text_in_loop:
        dataset = CachedDataset(
            latent_paths, captions=[i.sample.caption for i in plan.train], tokenizer=parts.tokenizer,
            prefixes=[i.sample.prefix for i in plan.train], shuffle=data.shuffle_tags, keep_tokens=data.keep_tokens, seed=opt.seed,
        )
        empty_conditioning = tokenize(parts.tokenizer, [""])[0]
        if not train_te:
            parts.text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    else:
        text_paths, text_stats = cache_text(
            [i.caption for i in items] + [""], parts.tokenizer, parts.text_encoder, parts.text_encoder_sha256, cache_dir, device, shard=shard, show_progress=is_main
        )
        accelerator.wait_for_everyone()
        empty_conditioning = load_file(text_paths[-1])["hidden_states"]
        dataset = CachedDataset(latent_paths, text_paths=text_paths[: len(plan.train)])
        parts.text_encoder.to("cpu")
    accelerator.wait_for_everyone()
    parts.vae.to("cpu")
    latent_stats = summed(latent_stats, accelerator)
    text_stats = summed(text_stats, accelerator) if text_stats else None
    if is_main:
        print(
            f"sdtune: latent cache {latent_stats.encoded} encoded, {latent_stats.reused} reused, "
            f"{latent_stats.invalidated} invalidated ({cache_dir})"
        )
        if text_stats:
            print(f"sdtune: text cache {text_stats.encoded} encoded, {text_stats.reused} reused")

    # What is trained. Frozen weights are stored in the autocast dtype; trainable
    # ones stay fp32 so small updates are not rounded away.
    unet, text_encoder = parts.unet, parts.text_encoder
    set_attention(unet, opt.attention, device)
    if opt.method == "lora":
        unet.to(device)
        add_lora(unet, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        if train_te:
            text_encoder.to(device, dtype=weight_dtype)
            add_lora(text_encoder, lora.rank, lora.alpha, lora.dropout, lora.text_encoder_target_modules)
            cast_training_params(text_encoder, dtype=torch.float32)
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(device).requires_grad_(True)
    if opt.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
    groups = [{"params": trainable_parameters(unet), "lr": opt.learning_rate}]
    if train_te:
        groups.append({"params": trainable_parameters(text_encoder), "lr": opt.text_encoder_learning_rate or opt.learning_rate})
    optimizer = make_optimizer(groups, opt.optimizer, (opt.adam_beta1, opt.adam_beta2), opt.adam_weight_decay, opt.adam_epsilon)
    lr_scheduler = get_scheduler(
        opt.lr_scheduler,
        optimizer,
        # The prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=opt.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=opt.max_steps * accelerator.num_processes,
    )
    # Each batch comes from one bucket (its latents share a size), in an order fixed by the seed.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=BucketBatchSampler([i.crop.bucket for i in plan.train], opt.batch_size, opt.seed),
        num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0,
    )
    trained = [unet, text_encoder] if train_te else [unet]
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    unet = trained[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler, scaling = parts.noise_scheduler, parts.vae.config.scaling_factor
    empty_conditioning = empty_conditioning.to(device)
    if accelerator.is_main_process:
        accelerator.init_trackers(out.name, config=_flat(recipe.model_dump(mode="json")))

    # The loop. Per step only the UNet (and TE) forward/backward and the
    # optimizer cost time; the host syncs only at log intervals.
    losses: list[torch.Tensor] = []
    step, started = 0, time.perf_counter()
    bar = tqdm(total=opt.max_steps, desc="training", unit="step", disable=not is_main)
    batches = _forever(loader)
    for module in trained:
        module.train()
    while step < opt.max_steps:
        batch = next(batches)
        with accelerator.accumulate(*trained):
            if text_in_loop:
                ids = drop_captions(batch["input_ids"], empty_conditioning, data.caption_dropout)
                conditioning = encode_prompts(trained[1] if train_te else text_encoder, ids)
            else:
                conditioning = drop_captions(batch["encoder_hidden_states"], empty_conditioning, data.caption_dropout)
            latents = sample_latents(batch["mean"], batch["std"], scaling)
            noise = sample_noise(latents, opt.noise_offset)
            timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, device)
            loss = denoising_loss(unet, scheduler, latents, conditioning, noise, timesteps, opt.min_snr_gamma)
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
        if step % opt.log_every == 0 or step == opt.max_steps:
            recent = torch.stack(losses[-opt.log_every * opt.gradient_accumulation_steps :]).mean().item()
            if not math.isfinite(recent):
                raise FloatingPointError(
                    f"loss is {recent} at step {step}; nothing was written. Likely causes: "
                    "train.learning_rate too high, or fp16 overflow (try bf16)"
                )
            lr = lr_scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"train/loss": recent, "train/lr": lr}, step=step)
    bar.close()
    accelerator.wait_for_everyone()

    # Results.
    if accelerator.is_main_process:
        export_dtype = DTYPES[recipe.export.dtype]
        if opt.method == "lora":
            tensors = kohya_state_dict(
                accelerator.unwrap_model(unet), accelerator.unwrap_model(trained[1]) if train_te else None, export_dtype
            )
            metadata = lora_metadata(
                base_model_version=parts.base_model_version,
                prediction_type=model.prediction_type,
                zero_terminal_snr=model.zero_terminal_snr,
                rank=lora.rank,
                alpha=lora.alpha,
                resolution=data.resolution,
                steps=step,
                learning_rate=opt.learning_rate,
                num_images=plan.images,
                seed=opt.seed,
                base_model_name=parts.name,
                base_model_sha256=parts.sha256,
                title=out.name,
                recipe_json=recipe.to_json(),
                trained_text_encoder=bool(train_te),
            )
            atomic.save_safetensors(tensors, result_path, metadata)
        else:
            save_diffusers_folder(model.path, accelerator.unwrap_model(unet), parts.noise_scheduler.config, result_path, export_dtype)
        atomic.write_text(out_dir / f"{out.name}.recipe.yaml", recipe.to_yaml())
        elapsed = time.perf_counter() - started
        print(f"sdtune: trained {step} steps in {elapsed:.1f}s ({step / elapsed:.2f} steps/s)")
        print(f"sdtune: wrote {result_path}")
        print(f"sdtune: recipe {out_dir / (out.name + '.recipe.yaml')}; logs {out_dir / 'logs'}")
    accelerator.end_training()
    return TrainResult(
        output=result_path,
        losses=torch.stack(losses).float().cpu().tolist(),
        latent_cache=latent_stats,
        text_cache=text_stats,
        unet=accelerator.unwrap_model(unet),
        text_encoder=accelerator.unwrap_model(trained[1]) if train_te else text_encoder,
    )


def make_optimizer(groups: list[dict], kind: str, betas: tuple[float, float], weight_decay: float, eps: float):
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("train.optimizer: adamw8bit needs bitsandbytes; `pip install sdtune[bnb]`") from None
        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps)


def save_diffusers_folder(base: str, unet, scheduler_config: dict, out: Path, dtype: torch.dtype) -> Path:
    """A full fine-tune as a diffusers folder: the base components with the trained UNet,
    and an inference scheduler carrying the training's prediction type and terminal SNR."""
    from diffusers import StableDiffusionPipeline  # pulls in image processors; only needed here

    pipe = StableDiffusionPipeline.from_pretrained(
        base,
        dtype=dtype,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Copy the trained weights into a UNet loaded in the export dtype (load_state_dict casts).
    pipe.unet.load_state_dict(unet.state_dict())
    tmp = out.with_name(f".{out.name}.tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _forever(loader):
    while True:
        yield from loader


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    return train(load_recipe(args.recipe, args.overrides))


if __name__ == "__main__":
    from sdtune.cli import _run

    sys.exit(_run(lambda: main(sys.argv[1:])))
