"""LoRA adapters through peft (diffusers' and transformers' ``add_adapter``)."""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

ADAPTER = "default"


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> list[str]:
    """Freeze ``model`` and add a trainable LoRA to every module whose name ends in a target.

    Returns the adapted module names. peft scales the update by ``alpha / rank``,
    the same rule kohya and both UIs use, so the alpha is exported unchanged.
    """
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    try:
        model.add_adapter(config)
    except ValueError as exc:
        raise ValueError(f"LoRA target modules {target_modules} matched no layer of {type(model).__name__}: {exc}") from None
    return list(lora_layers(model))


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Adapted modules by their path in ``model`` (the path of the layer they wrap)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
