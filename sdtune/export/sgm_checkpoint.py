"""Single-file SDXL checkpoints (SGM layout): read them as diffusers components, write them back.

As for SD 1.x/2.x (``checkpoint.py``), reading is offline: the architecture comes
from the tensor shapes on top of the shipped SDXL 1.0 config (``configs/sdxl.json``),
and what shapes cannot show follows the real model (64-channel heads everywhere)
unless the file carries sdtune's ``sdtune.architecture`` metadata. The prediction
type comes from the ``v_pred`` / ``ztsnr`` markers, which ComfyUI reads for
SDXL-family models (``supported_models.SDXL.model_type``) and A1111 too
(``v_pred`` selects its ``sd_xl_v.yaml``), so an SDXL file needs no sidecars.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdtune.export import ldm_keys, sgm_keys
from sdtune.export.checkpoint import (
    HIDDEN_FIELDS,
    Checkpoint,
    _assign,
    base_config,
    read_tensors,
    unet_fields_from_shapes,
    vae_fields_from_shapes,
    write_marked,
)
from sdtune.export.markers import flags_from_file
from sdtune.export.metadata import SDXL

SDXL_HIDDEN_FIELDS = HIDDEN_FIELDS | {"text_encoder_2": HIDDEN_FIELDS["text_encoder"]}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def is_sgm(keys) -> bool:
    """An SDXL-family single file: its text encoders live under ``conditioner.embedders.``."""
    return any(k.startswith(sgm_keys.EMBEDDERS_PREFIX) for k in keys)


def split_sgm(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The SGM tensors of each component (and the markers); names that belong to none are returned too."""
    if any(k.startswith("lora_") or ".lora_" in k for k in tensors):
        raise ValueError("this file holds LoRA tensors, not a full model; `sdtune inspect FILE` says what it is")
    prefixes = {
        "unet": ldm_keys.UNET_PREFIX, "vae": ldm_keys.VAE_PREFIX,
        "text_encoder": sgm_keys.CLIP_L_PREFIX, "text_encoder_2": sgm_keys.BIGG_PREFIX,
    }  # fmt: skip
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (*prefixes, "markers")}
    ignored = []
    for key, value in tensors.items():
        part = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is None and key in ldm_keys.MARKER_KEYS:
            part = "markers"
        if part is None:
            ignored.append(key)
        else:
            parts[part][key] = value
    missing = [name for name in COMPONENTS if not parts[name]]
    if missing:
        raise ValueError(
            f"this SDXL-layout checkpoint has no {', '.join(missing)} tensors (SDXL needs conditioner.embedders.0.transformer.* "
            "CLIP-L and conditioner.embedders.1.model.* OpenCLIP bigG); the refiner and other SGM models are not supported"
        )
    return parts, ignored


def _depths(u: dict[str, tuple[int, ...]], block: str) -> int:
    """How many transformer blocks the SpatialTransformer at ``block`` (e.g. ``input_blocks.4.1``) has."""
    start = f"{block}.transformer_blocks."
    return len({k.removeprefix(start).split(".")[0] for k in u if k.startswith(start)})


def configs_from_sgm_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """diffusers configs for the SGM tensor ``shapes`` (full keys), starting from the shipped SDXL config."""
    configs = base_config(SDXL)
    u, first, attention, fields = unet_fields_from_shapes(shapes)
    widths = fields["block_out_channels"]
    # diffusers gives each level one transformer depth (the middle block takes the last level's).
    depths = [_depths(u, f"input_blocks.{n}.1") if has else 1 for n, has in zip(first, attention)]
    if _depths(u, "middle_block.1") != depths[-1]:
        raise ValueError(
            f"the middle block has {_depths(u, 'middle_block.1')} transformer blocks and the last level {depths[-1]}; "
            "diffusers' SDXL UNet cannot hold that layout"
        )
    te2 = {k.removeprefix(sgm_keys.BIGG_PREFIX): s for k, s in shapes.items() if k.startswith(sgm_keys.BIGG_PREFIX)}
    pooled = te2["text_projection"][1]
    adm_in = u["label_emb.0.0.weight"][1]
    configs["unet"] |= fields | {
        "transformer_layers_per_block": depths,
        "attention_head_dim": [max(1, w // 64) for w in widths],
        "projection_class_embeddings_input_dim": adm_in,
        # add_embedding reads the pooled text embedding and six Fourier-embedded size/crop numbers.
        "addition_time_embed_dim": (adm_in - pooled) // 6,
    }
    configs["vae"] |= vae_fields_from_shapes(shapes, 8 * configs["unet"]["sample_size"])
    te1 = {k.removeprefix(sgm_keys.CLIP_L_PREFIX): s for k, s in shapes.items() if k.startswith(sgm_keys.CLIP_L_PREFIX)}
    vocab, hidden = te1["embeddings.token_embedding.weight"]
    configs["text_encoder"] |= {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": te1["encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": 1 + max(int(k.split(".")[2]) for k in te1 if k.startswith("encoder.layers.")),
        "max_position_embeddings": te1["embeddings.position_embedding.weight"][0],
        "num_attention_heads": max(1, hidden // 64),
    }
    vocab, hidden = te2["token_embedding.weight"]
    configs["text_encoder_2"] |= {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": te2["transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_hidden_layers": 1 + max(int(k.split(".")[2]) for k in te2 if k.startswith("transformer.resblocks.")),
        "max_position_embeddings": te2["positional_embedding"][0],
        "num_attention_heads": max(1, hidden // 64),
        "projection_dim": pooled,
    }
    return configs


def checkpoint_from_sgm(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Checkpoint:
    """An SDXL file's tensors as diffusers state dicts and configs; embedder tensors without a
    diffusers counterpart (CLIP-L's position_ids, bigG's logit_scale) are kept as ``extras``."""
    parts, ignored = split_sgm(tensors)
    prediction_type, ztsnr = flags_from_file(path, set(parts["markers"]), metadata)
    configs = configs_from_sgm_shapes({k: tuple(v.shape) for part in parts.values() for k, v in part.items()})
    stored = json.loads(metadata.get("sdtune.architecture", "{}"))
    for component, hidden in SDXL_HIDDEN_FIELDS.items():
        configs[component] |= {k: v for k, v in stored.get(component, {}).items() if k in hidden}
    layers = configs["text_encoder_2"]["num_hidden_layers"]
    text_encoder = sgm_keys.clip_l_from_sgm(parts["text_encoder"])
    text_encoder_2 = sgm_keys.bigg_from_sgm(parts["text_encoder_2"], layers)
    used = set(sgm_keys.clip_l_to_sgm(text_encoder)) | set(sgm_keys.bigg_to_sgm(text_encoder_2, layers))
    extras = {k: v for name in ("text_encoder", "text_encoder_2") for k, v in parts[name].items() if k not in used}
    vae = configs["vae"]
    return Checkpoint(
        version=SDXL,
        configs=configs,
        unet=sgm_keys.unet_from_sgm(parts["unet"], ldm_keys.unet_layout(configs["unet"])),
        vae=ldm_keys.vae_from_ldm(parts["vae"], len(vae["block_out_channels"]), vae["layers_per_block"]),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        extras=extras,
        prediction_type=prediction_type,
        zero_terminal_snr=ztsnr,
        metadata=metadata,
        ignored=ignored,
    )


def read_sgm_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    tensors, metadata = read_tensors(path, allow_pickle)
    if not is_sgm(tensors):
        raise ValueError(f"{path} has no conditioner.embedders.* text encoders; it is not an SDXL-family checkpoint")
    return checkpoint_from_sgm(path, tensors, metadata)


def build_sdxl_models(checkpoint: Checkpoint, unet_dtype: torch.dtype = torch.float32):
    """diffusers UNet and VAE and the two transformers text encoders holding an SDXL checkpoint's
    tensors (VAE and text encoders in fp32): ``(unet, vae, text_encoder, text_encoder_2)``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = checkpoint.configs
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    _assign(unet, checkpoint.unet, unet_dtype, "UNet")
    _assign(vae, checkpoint.vae, torch.float32, "VAE")
    for model, tensors, what in ((text_encoder, checkpoint.text_encoder, "text encoder"), (text_encoder_2, checkpoint.text_encoder_2, "text encoder 2")):
        # position_ids is a non-persistent buffer no file holds: rebuild it as transformers does.
        for module in model.modules():
            if isinstance(getattr(module, "position_ids", None), torch.Tensor) and module.position_ids.is_meta:
                module.position_ids = torch.arange(module.position_ids.shape[-1]).unsqueeze(0)
        _assign(model, tensors, torch.float32, what)
    return unet, vae, text_encoder, text_encoder_2


def sgm_tensors(unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype = torch.float16, extras=None) -> dict[str, torch.Tensor]:
    """All weights of an SDXL model in the SGM layout, floats cast to ``dtype``.

    ``extras`` (carried from a base file) win over the generated position_ids and
    logit_scale, so a file read and written again is unchanged.
    """
    out = sgm_keys.unet_to_sgm(unet.state_dict(), ldm_keys.unet_layout(unet.config))
    out |= ldm_keys.vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels), vae.config.layers_per_block)
    out |= sgm_keys.clip_l_to_sgm(text_encoder.state_dict())
    out |= sgm_keys.bigg_to_sgm(text_encoder_2.state_dict(), text_encoder_2.config.num_hidden_layers)
    out |= sgm_keys.sgm_extras(text_encoder.config.max_position_embeddings, dtype) | (extras or {})
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in out.items()}


def sdxl_architecture_metadata(unet, vae, text_encoder, text_encoder_2) -> str:
    """The config fields tensor shapes cannot show, as JSON (see ``SDXL_HIDDEN_FIELDS``)."""
    configs = {
        "unet": dict(unet.config), "vae": dict(vae.config),
        "text_encoder": text_encoder.config.to_dict(), "text_encoder_2": text_encoder_2.config.to_dict(),
    }  # fmt: skip
    return json.dumps({part: {k: configs[part][k] for k in fields if k in configs[part]} for part, fields in SDXL_HIDDEN_FIELDS.items()})


def save_sdxl_checkpoint(
    path: str | Path, unet, vae, text_encoder, text_encoder_2, *, prediction_type: str, zero_terminal_snr: bool,
    dtype: torch.dtype = torch.float16, extras: dict[str, torch.Tensor] | None = None, title: str | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> list[Path]:  # fmt: skip
    """Write an SDXL single-file checkpoint with the ``v_pred`` / ``ztsnr`` markers; returns the files written."""
    path = Path(path)
    tensors = sgm_tensors(unet, vae, text_encoder, text_encoder_2, dtype, extras)
    architecture = sdxl_architecture_metadata(unet, vae, text_encoder, text_encoder_2)
    return [write_marked(path, tensors, SDXL, prediction_type, zero_terminal_snr, 8 * unet.config.sample_size, architecture,
                         title, extra_metadata)]
