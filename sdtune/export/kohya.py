"""kohya-format LoRA files, the format ComfyUI and AUTOMATIC1111 load (shared/DESIGN.md, rules 1-3).

Key grammar, per adapted layer ``<name>``:
``<name>.lora_down.weight`` (rank x in [x kh x kw]), ``<name>.lora_up.weight``
(out x rank [x 1 x 1]) and ``<name>.alpha`` (0-dim, the trained alpha: the UIs
scale the update by alpha / rank). ``<name>`` is a prefix plus the diffusers /
transformers module path with ``.`` replaced by ``_``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from sdtune.adapters import ADAPTER, lora_layers

UNET_PREFIX = "lora_unet_"
# SD1 and SD2 alike: A1111 drops `lora_te1_` on SD2 (DESIGN rule 3).
TEXT_ENCODER_PREFIX = "lora_te_"
# transformers >= 5 CLIPTextModel paths lack this level; the UIs address layers with it.
TEXT_MODEL_LEVEL = "text_model."


def kohya_name(prefix: str, module_path: str) -> str:
    if prefix == TEXT_ENCODER_PREFIX and not module_path.startswith(TEXT_MODEL_LEVEL):
        module_path = TEXT_MODEL_LEVEL + module_path
    return prefix + module_path.replace(".", "_")


def kohya_state_dict(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The trained LoRA of ``unet`` (and ``text_encoder``) as kohya keys, weights in ``dtype``.

    Alphas are written in fp32, so any trained alpha survives exactly.
    """
    tensors: dict[str, torch.Tensor] = {}
    for prefix, model in ((UNET_PREFIX, unet), (TEXT_ENCODER_PREFIX, text_encoder)):
        if model is None:
            continue
        for path, layer in lora_layers(model).items():
            name = kohya_name(prefix, path)
            tensors[f"{name}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to(dtype)
            tensors[f"{name}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to(dtype)
            tensors[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=torch.float32)
    return tensors


def addressable_layers(prefix: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of ``model`` by the kohya name a UI would look it up by."""
    return {
        kohya_name(prefix, path): module
        for path, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in path
    }


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


@torch.no_grad()
def merge_lora(
    tensors: dict[str, torch.Tensor],
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    multiplier: float = 1.0,
) -> list[str]:
    """Add a kohya LoRA into base weights, as the UIs do: ``W += m * alpha/rank * up @ down``.

    A missing alpha means alpha = rank (scale 1.0), as in both UIs. Returns the
    merged layer names; a key that addresses no layer is an error, not a skip.
    """
    layers = addressable_layers(UNET_PREFIX, unet)
    if text_encoder is not None:
        layers |= addressable_layers(TEXT_ENCODER_PREFIX, text_encoder)
    names = sorted({key.split(".", 1)[0] for key in tensors})
    unknown = [name for name in names if name not in layers]
    if unknown:
        raise KeyError(f"{len(unknown)} LoRA layer(s) address no module of this model, e.g. {unknown[:3]}")
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
        weight = layers[name].weight
        delta = up.flatten(1) @ down.flatten(1)
        if weight.ndim == 4 and down.shape[2:] != (1, 1):
            # kxk down, 1x1 up: the composition is a kxk conv.
            delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        weight += (multiplier * alpha / rank * delta.reshape(weight.shape)).to(weight.dtype)
    return names
