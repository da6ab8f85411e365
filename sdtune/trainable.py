"""What trains and how the result is written: LoRA layers or every weight switched on,
an earlier LoRA merged first, the encoders placed (or freed) after caching, the
result written with the EMA weights."""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params

from sdtune.adapters import FirstStepGradients, add_lora, trainable_parameters
from sdtune.export.results import ResultSpec, write_result
from sdtune.models import set_attention
from sdtune.sdxl import SdxlComponents, unused_text_encoder_modules
from sdtune.textual_inversion import trainable_rows


def place_encoders(parts, device: torch.device, weight_dtype: torch.dtype, frozen_in_loop: bool, trains: bool,
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


def make_trainable(
    unet, text_encoder, method: str, lora, attention: str, gradient_checkpointing: bool, learning_rate: float,
    text_encoder_learning_rate: float | None, device: torch.device, weight_dtype: torch.dtype,
) -> list[dict]:
    """Put the UNet (and ``text_encoder`` when it trains) on ``device`` with what trains
    switched on: LoRA layers (``lora``: the recipe's LoRA settings) or every weight.
    Frozen weights are stored in the autocast dtype; trainable ones stay fp32 so small
    updates are not rounded away. Returns the optimizer's param groups."""
    set_attention(unet, attention, device)
    if method == "textual_inversion":
        return trainable_rows(unet, text_encoder, device, weight_dtype, learning_rate, gradient_checkpointing)
    unet.to(device)
    if text_encoder is not None:
        text_encoder.to(device)
        if method == "lora":
            text_encoder.to(dtype=weight_dtype)
    if method == "lora":
        add_lora(unet, lora.rank, lora.alpha, lora.dropout, lora.unet_targets(), lora.conv_rank, lora.conv_alpha, lora.init,
                 algorithm=lora.algorithm, use_dora=lora.use_dora)
        if text_encoder is not None:
            add_lora(text_encoder, lora.rank, lora.alpha, lora.dropout, lora.text_encoder_target_modules, init=lora.init,
                     exclude=unused_text_encoder_modules(text_encoder, lora.sdxl_text_encoders),
                     algorithm=lora.algorithm, use_dora=lora.use_dora)
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
            text_encoder.activation_checkpointing_enable()
    groups = [{"params": trainable_parameters(unet), "lr": learning_rate}]
    if text_encoder is not None:
        groups.append({"params": trainable_parameters(text_encoder), "lr": text_encoder_learning_rate or learning_rate})
    return groups


def write_result_with_ema(stem: Path, spec: ResultSpec, view, ema, params: list, parts, steps: int, num_images: int) -> list[Path]:
    """The result at ``stem``, with the EMA weights when EMA is on; the training weights are left as
    they were. Every process calls it (``view``, a ``sharded.ModelView``, gathers sharded weights);
    the main one writes and returns the paths written, the others []."""
    swap = ema is not None and (view.sharded or view.accelerator.is_main_process)  # sharded: every slice
    if swap:
        ema.store(params)
        ema.copy_to(params)
    try:
        models = view.whole()
        return write_result(stem, spec, models["unet"], models.get("text_encoder"), parts, steps, num_images) if models else []
    finally:
        if swap:
            ema.restore(params)


def merge_first(parts, path: str, weight: float, allow_pickle: bool) -> None:
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


def network_args(lora) -> dict[str, str]:
    """kohya's ss_network_args: conv_dim/conv_alpha when 3x3 convolutions are adapted; for LoHa,
    LoKr and DoRA, LyCORIS' (lycoris.kohya) ``algo`` and ``dora_wd``/``wd_on_output``."""
    from sdtune.export.lycoris import lycoris_network_args

    args = lycoris_network_args(lora.algorithm, lora.use_dora)
    if lora.preset not in ("locon", "custom") or (lora.conv_rank is None and lora.conv_alpha is None):
        return args
    return args | {"conv_dim": str(lora.conv_rank or lora.rank), "conv_alpha": str(lora.conv_alpha or lora.alpha)}


def prepare_models(accelerator, models: list, optimizer, lr_scheduler) -> list:
    """accelerate's ``prepare`` of ``models``, optimizer and schedule, except that a model with
    nothing to train (textual inversion's UNet) gets its autocast but no DDP wrapper: DDP
    refuses a module without gradients (accelerate skips it on GPUs, not on CPU processes).
    The first optimizer step then says which adapter layers no gradient reached."""
    from sdtune.zero import is_deepspeed

    deepspeed = is_deepspeed(accelerator)
    first_step = FirstStepGradients(models, accelerator, deepspeed)
    if not deepspeed:  # under DeepSpeed, the optimizer DeepSpeed steps (below)
        first_step.attach(optimizer)
    frozen = {id(m): m for m in models if not any(p.requires_grad for p in m.parameters())}
    if not frozen:
        prepared = list(accelerator.prepare(*models, optimizer, lr_scheduler))
        if deepspeed:  # the optimizer DeepSpeed steps: AdamW on the flat partitions, or its CPU Adam (offload)
            stepped = accelerator.deepspeed_engine_wrapped.engine.optimizer.optimizer
            first_step.attach(stepped)
            # The schedule sets the learning rate in that one's groups: the CPU Adam is a new optimizer,
            # which shares AdamW's groups only until a checkpoint's state replaces them.
            prepared[-1].scheduler.optimizer = stepped
        return prepared
    ready = {key: accelerator.prepare_model(m, evaluation_mode=True) for key, m in frozen.items()}
    *trained, optimizer, lr_scheduler = accelerator.prepare(*[m for m in models if id(m) not in ready], optimizer, lr_scheduler)
    trained = iter(trained)
    return [ready[id(m)] if id(m) in ready else next(trained) for m in models] + [optimizer, lr_scheduler]
