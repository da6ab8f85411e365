"""kohya-format LoRA files, the format ComfyUI and AUTOMATIC1111 load (shared/DESIGN.md, rules 1-3).

Key grammar, per adapted layer ``<name>``:
``<name>.lora_down.weight`` (rank x in [x kh x kw]), ``<name>.lora_up.weight``
(out x rank [x 1 x 1]) and ``<name>.alpha`` (0-dim, the trained alpha: the UIs
scale the update by alpha / rank). ``<name>`` is a prefix plus the diffusers /
transformers module path with ``.`` replaced by ``_``. DoRA, LoHa and LoKr layers use
LyCORIS' keys under the same names (``lycoris.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from sdtune.adapters import lora_layers
from sdtune.export import sgm_keys
from sdtune.export.lycoris import layer_tensors, weight_delta
from sdtune.export.ldm_keys import unet_layout
from sdtune.export.metadata import SDXL
from sdtune.weight_files import read_weights

UNET_PREFIX = "lora_unet_"
# SD1 and SD2 alike: A1111 drops `lora_te1_` on SD2 (DESIGN rule 3).
TEXT_ENCODER_PREFIX = "lora_te_"
# SDXL: CLIP-L and OpenCLIP bigG, as kohya names them and both UIs map them.
TE1_PREFIX, TE2_PREFIX = "lora_te1_", "lora_te2_"
# transformers >= 5 CLIPTextModel paths lack this level; the UIs address layers with it.
TEXT_MODEL_LEVEL = "text_model."


def kohya_name(prefix: str, module_path: str, sgm_table: dict[str, str] | None = None) -> str:
    """``prefix`` + the module path with ``.`` -> ``_``. Text encoders get the ``text_model`` level back;
    an SDXL UNet (``sgm_table``) is named by its SGM modules, as kohya writes SDXL LoRAs
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)."""
    if prefix.startswith("lora_te") and not module_path.startswith(TEXT_MODEL_LEVEL):
        module_path = TEXT_MODEL_LEVEL + module_path
    if prefix == UNET_PREFIX and sgm_table is not None:
        module_path = sgm_keys.module_to_sgm(module_path, sgm_table)
    return prefix + module_path.replace(".", "_")


def sdxl_unet_table(unet: torch.nn.Module) -> dict[str, str]:
    return sgm_keys.unet_table(unet_layout(unet.config))


# A1111 applies a text-encoder LoRA to OpenCLIP's fused attention (SD 2's encoder, SDXL's
# second) only when all four projections of a layer are present (rule 3); it applies
# none otherwise.
SD2_ATTENTION = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
OPENCLIP_PREFIXES = {"sd_v2": TEXT_ENCODER_PREFIX, SDXL: TE2_PREFIX}


def partial_sd2_attention(layer_names, prefix: str = TEXT_ENCODER_PREFIX) -> list[str]:
    """OpenCLIP text-encoder layers (named ``prefix``...) whose q/k/v/out_proj are adapted only in part."""
    pattern = re.compile(re.escape(prefix) + r"text_model_encoder_layers_(\d+)_(.+)")
    kinds: dict[str, set[str]] = {}
    for name in layer_names:
        match = pattern.fullmatch(name)
        if match and match.group(2) in SD2_ATTENTION:
            kinds.setdefault(match.group(1), set()).add(match.group(2))
    return [f"layer {n}: {sorted(k)}" for n, k in sorted(kinds.items(), key=lambda i: int(i[0])) if len(k) != 4]


def check_sd2_text_encoder_targets(targets: list[str], base_model_version: str) -> None:
    """Fail before training when an SD 2 (or SDXL bigG) text-encoder LoRA would be ignored by A1111."""
    attention = {t for t in targets if t in ("q_proj", "k_proj", "v_proj", "out_proj")}
    if base_model_version in OPENCLIP_PREFIXES and attention and len(attention) != 4:
        model = "SD 2" if base_model_version == "sd_v2" else "SDXL (its OpenCLIP bigG encoder)"
        raise ValueError(
            f"lora.text_encoder_target_modules has {sorted(attention)} of the attention projections; on {model}, "
            "A1111 applies a text-encoder LoRA only when q_proj, k_proj, v_proj and out_proj are all adapted. "
            "Add the missing ones (or none of them)"
        )


def kohya_state_dict(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    dtype: torch.dtype = torch.float16,
    base_model_version: str | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The trained LoRA of ``unet`` (and the text encoders) as kohya keys, weights in ``dtype``.

    Alphas are written in fp32, so any trained alpha survives exactly. Conv
    layers (LoCon) keep their kernel in ``lora_down`` and a 1x1 ``lora_up``,
    which is how peft stores them too. For SD 2 and SDXL's bigG (``base_model_version``),
    a partly adapted text-encoder attention is an error (see ``SD2_ATTENTION``).
    SDXL (``base_model_version`` ``sdxl_base_v1-0``) names the UNet by its SGM modules
    and the encoders ``lora_te1_`` (``text_encoder``) and ``lora_te2_`` (``text_encoder_2``).
    """
    sdxl = base_model_version == SDXL
    if text_encoder_2 is not None and not sdxl:
        raise ValueError("a second text encoder belongs to SDXL; pass base_model_version='sdxl_base_v1-0'")
    table = sdxl_unet_table(unet) if sdxl else None
    parts = ((UNET_PREFIX, unet), (TE1_PREFIX if sdxl else TEXT_ENCODER_PREFIX, text_encoder), (TE2_PREFIX, text_encoder_2))
    tensors: dict[str, torch.Tensor] = {}
    for prefix, model in parts:
        if model is None:
            continue
        for path, layer in lora_layers(model).items():
            name = kohya_name(prefix, path, table)
            tensors |= {f"{name}.{suffix}": value for suffix, value in layer_tensors(layer, dtype).items()}
    if base_model_version in OPENCLIP_PREFIXES:
        partial = partial_sd2_attention({key.split(".", 1)[0] for key in tensors}, OPENCLIP_PREFIXES[base_model_version])
        if partial:
            model = "SD 2" if base_model_version == "sd_v2" else "SDXL bigG (lora_te2_)"
            raise ValueError(
                f"{model} text-encoder LoRA adapts only part of q/k/v/out_proj in {partial[:3]}; A1111 would apply "
                "none of them. Train it with all four projections (lora.text_encoder_target_modules)"
            )
    return tensors


def addressable_layers(prefix: str, model: torch.nn.Module, sgm_table: dict[str, str] | None = None) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of ``model`` by the kohya name a UI would look it up by. An SDXL UNet's
    (``sgm_table``) by its SGM name, and by its diffusers name, which both UIs map too."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in path:
            layers[kohya_name(prefix, path)] = module
            if sgm_table is not None:
                layers[kohya_name(prefix, path, sgm_table)] = module
    return layers


def read_lora(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata (a pickled one only with ``allow_pickle``; see weight_files)."""
    return read_weights(path, allow_pickle)


@torch.no_grad()
def merge_lora(
    tensors: dict[str, torch.Tensor],
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    multiplier: float = 1.0,
    text_encoder_2: torch.nn.Module | None = None,
) -> list[str]:
    """Add a kohya LoRA into base weights, as the UIs do: ``W += m * alpha/rank * up @ down``
    (DoRA, LoHa and LoKr layers by their rules in ``lycoris.py``).

    A missing alpha means alpha = rank (scale 1.0), as in both UIs. Returns the
    merged layer names; a key that addresses no layer is an error, not a skip.
    With ``text_encoder_2`` the model is SDXL: ``lora_te1_`` / ``lora_te2_`` encoders and
    a UNet addressed by SGM (or diffusers) names.
    """
    sdxl = text_encoder_2 is not None
    layers = addressable_layers(UNET_PREFIX, unet, sdxl_unet_table(unet) if sdxl else None)
    if text_encoder is not None:
        layers |= addressable_layers(TE1_PREFIX if sdxl else TEXT_ENCODER_PREFIX, text_encoder)
    if sdxl:
        layers |= addressable_layers(TE2_PREFIX, text_encoder_2)
    names = sorted({key.split(".", 1)[0] for key in tensors})
    unknown = [name for name in names if name not in layers]
    if unknown:
        raise KeyError(f"{len(unknown)} LoRA layer(s) address no module of this model, e.g. {unknown[:3]}")
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)
        parts[name][suffix] = value
    for name in names:
        # A kxk lora_down and a 1x1 lora_up compose to a kxk conv: up @ down.flatten(1), reshaped.
        weight = layers[name].weight
        weight += (multiplier * weight_delta(parts[name], weight)).to(weight.dtype)
    return names


# PEFT / diffusers LoRA names: `<component prefix><module path>.lora_A.weight` (down) / `.lora_B.weight` (up).
PEFT_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
PEFT_COMPONENTS = (  # first match wins; a bare module path is a UNet's (peft's get_peft_model_state_dict of a UNet)
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("unet.", "unet"),
    ("base_model.model.", "unet"),
    ("", "unet"),
)
COMPONENT_PREFIXES = {
    "sd": {"unet": UNET_PREFIX, "text_encoder": TEXT_ENCODER_PREFIX},
    "sdxl": {"unet": UNET_PREFIX, "text_encoder": TE1_PREFIX, "text_encoder_2": TE2_PREFIX},
}


def peft_to_kohya(
    tensors: dict[str, torch.Tensor], alphas: dict[str, float], dtype: torch.dtype | None = None, sdxl: bool = False
) -> dict[str, torch.Tensor]:
    """A PEFT / diffusers LoRA state dict in kohya names (another trainer's LoRA, or ours saved by peft).

    ``alphas`` maps a component (``unet``, ``text_encoder``, ``text_encoder_2``) to its
    ``lora_alpha``; a component without one keeps diffusers' loading behaviour, alpha =
    rank (scale 1). Weights keep their dtype unless ``dtype`` is given. ``sdxl`` names
    the UNet by SDXL 1.0's SGM modules and the encoders ``lora_te1_`` / ``lora_te2_``.
    """
    prefixes = COMPONENT_PREFIXES["sdxl" if sdxl else "sd"]
    table = None
    if sdxl:
        from sdtune.export.checkpoint import base_config

        table = sgm_keys.unet_table(unet_layout(base_config(SDXL)["unet"]))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"key {key!r} is neither a kohya LoRA weight (lora_unet_*, lora_te_*) nor a PEFT/diffusers one "
                "(<module>.lora_A.weight / .lora_B.weight); PEFT-named LoHa/LoKr and DoRA files are not supported (kohya-named ones are)"
            )
        path, part = match.groups()
        start, component = next((c, p) for c, p in PEFT_COMPONENTS if path.startswith(c))
        if component not in prefixes:
            raise ValueError(f"{key}: a second text encoder belongs to SDXL; convert it with --base-version {SDXL}")
        try:
            name = kohya_name(prefixes[component], path.removeprefix(start), table)
        except KeyError:
            raise ValueError(f"{key}: no SDXL UNet module is named {path.removeprefix(start)!r}") from None
        pairs.setdefault(name, {"component": component})[part] = value
    out: dict[str, torch.Tensor] = {}
    for name, parts in pairs.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{name}: only one of lora_A/lora_B is present; the file is incomplete")
        rank = parts["A"].shape[0]
        out[f"{name}.lora_down.weight"] = parts["A"] if dtype is None else parts["A"].to(dtype)
        out[f"{name}.lora_up.weight"] = parts["B"] if dtype is None else parts["B"].to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(alphas.get(parts["component"], rank)), dtype=torch.float32)
    return out


def peft_alphas(metadata: dict[str, str], source: str | Path) -> dict[str, float]:
    """Each component's ``lora_alpha`` as diffusers (>= 0.33) records it in ``lora_adapter_metadata``."""
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    components = ("unet", "text_encoder", "text_encoder_2")
    if any(adapter.get(f"{c}.{pattern}") for c in components for pattern in ("alpha_pattern", "rank_pattern")):
        raise ValueError(f"{source} sets per-layer ranks or alphas (rank_pattern/alpha_pattern), which sdtune does not convert")
    return {c: float(adapter[f"{c}.lora_alpha"]) for c in components if adapter.get(f"{c}.lora_alpha") is not None}


def read_lora_as_kohya(path: str | Path, allow_pickle: bool = False, sdxl: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya LoRA file as it is, or a PEFT/diffusers one converted to kohya names (same merge rule)."""
    tensors, metadata = read_lora(path, allow_pickle)
    if not any(key.startswith((UNET_PREFIX, "lora_te")) for key in tensors):
        try:
            tensors = peft_to_kohya(tensors, peft_alphas(metadata, path), sdxl=sdxl)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return tensors, metadata
