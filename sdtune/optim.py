"""Optimizers and learning-rate schedules, built from flat settings."""

from __future__ import annotations

import importlib

import torch
from diffusers.optimization import get_scheduler

from sdtune.errors import MissingExtraError

# name -> (module, class, the extra that installs it)
_OPTIONAL = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb"),
    "lion": ("lion_pytorch", "Lion", "lion"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigy"),
}


def make_optimizer(
    groups: list[dict], kind: str, betas: tuple[float, float], weight_decay: float, eps: float
) -> torch.optim.Optimizer:
    """``groups`` are torch param groups, each with its own ``lr``."""
    if kind == "adamw":
        # fused runs the whole update in one kernel per device (CUDA and CPU); on CPU it is
        # ~6x faster than the default per-tensor loop for a LoRA's hundreds of small
        # tensors (benchmarks/train.py's report), with the same result up to float rounding.
        devices = {p.device.type for group in groups for p in group["params"]}
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps, fused=devices <= {"cuda", "cpu"} or None)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        # With a recipe learning rate: no relative step or parameter scaling (the
        # settings the SD trainers use), so train.learning_rate means what it says.
        return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=weight_decay)
    module, name, extra = _OPTIONAL[kind]
    try:
        optimizer_class = getattr(importlib.import_module(module), name)
    except ImportError:
        raise MissingExtraError(f"train.optimizer: {kind} needs an optional package; `pip install sdtune[{extra}]`") from None
    if kind == "lion":
        return optimizer_class(groups, betas=betas, weight_decay=weight_decay)
    return optimizer_class(groups, betas=betas, weight_decay=weight_decay, eps=eps)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, num_cycles: int, power: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-optimizer-step schedule. ``one_cycle`` rises over the warm-up (or the first
    quarter) to each group's lr and anneals to near zero (Smith & Topin 2017)."""
    if name == "one_cycle":
        if total_steps < 4:
            raise ValueError("train.lr_scheduler: one_cycle needs at least 4 steps (a rise and a fall)")
        rise = warmup_steps / total_steps if warmup_steps else 0.25
        # OneCycleLR needs at least two steps in each phase.
        rise = min(max(rise, 2 / total_steps), (total_steps - 2) / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=rise,
            cycle_momentum=False,
        )
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, num_cycles=num_cycles, power=power
    )

# Optimizers whose update is elementwise and whose state has the parameters' shapes, so
# they do on each process's flat slice of the weights (FSDP, DeepSpeed) what they would
# on the whole.
ELEMENTWISE_OPTIMIZERS = {"AdamW": "adamw", "Lion": "lion"}
SLICE_UNSAFE_OPTIMIZERS = {  # class -> (recipe name, why not on flat slices)
    "AdamW8bit": ("adamw8bit", "its 8-bit state is quantized in blocks that do not follow the parameters' shapes "
                  "(under FSDP the first sharded checkpoint fails)"),
    "Adafactor": ("adafactor", "it factors the state of 2-D weights, and the engine hands it flat 1-D slices: it "
                  "would silently run unfactored, a different optimizer"),
    "Prodigy": ("prodigy", "it sets its step size from sums over all parameters, which each process would take "
                "over its own slice only"),
}
