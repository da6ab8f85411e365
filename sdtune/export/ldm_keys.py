"""diffusers <-> LDM (CompVis) tensor names of SD 1.x/2.x single-file checkpoints (shared/DESIGN.md, rule 5).

The maps are tables of module paths: a tensor is renamed by its longest module
prefix that has an entry (``down_blocks.0.resnets.1.conv1`` ->
``input_blocks.2.0.in_layers.2``) and keeps the rest of its name
(``.weight``). The block tables are laid out from the block structure
(levels, layers per block, which levels have attention), so they cover
reduced-width test models of the same topology as SD 1.5 / 2.1 exactly.

Where the two layouts differ by more than a name:
- VAE mid-block attention: diffusers Linear (out, in) vs LDM 1x1 conv (out, in, 1, 1).
- SD 2.x text encoder (OpenCLIP): q/k/v are fused into ``attn.in_proj_*``; the
  file has 24 resblocks and a ``text_projection``, the diffusers encoder only the
  first 23 layers (SD 2 conditions on the penultimate layer). See ``openclip_extras``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x, CLIP ViT-L (HF layout)
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x, OpenCLIP ViT-H
# ComfyUI writes these empty tensors to mark v-prediction / zero terminal SNR (rule 6).
MARKER_KEYS = ("v_pred", "ztsnr")

# UNet: diffusers module -> LDM module.
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Transformer2DModel and SpatialTransformer share every inner name (proj_in,
# transformer_blocks.N.attn1.to_q, ff.net.0.proj, ...): only the block moves.

# VAE: diffusers module -> LDM module.
VAE_TOP = {
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_MID = {"mid_block.resnets.0": "mid.block_1", "mid_block.resnets.1": "mid.block_2"}
# Linear in diffusers, 1x1 conv in LDM.
VAE_CONV_ATTENTION = ("q", "k", "v", "proj_out")

# SD 2.x OpenCLIP text encoder: diffusers (transformers CLIPTextModel) -> OpenCLIP.
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
OPENCLIP_FUSED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # -> attn.in_proj_{weight,bias}, in this order
# OpenCLIP's logit_scale after training: ln(100), where CLIP clamps it. No SD model
# uses it, but the original files carry it (SD 2's and SDXL's) and loaders expect it.
LOGIT_SCALE = math.log(100.0)
OPENCLIP_RESBLOCK_TENSORS = (
    "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
    "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """The block structure both UNet names and VAE names are laid out from."""

    levels: int  # resolution levels (SD: 4)
    layers_per_block: int  # resnets per down level (SD: 2; up levels have one more)
    attention: tuple[bool, ...]  # per down level: has cross-attention blocks (SD: T, T, T, F)


def unet_layout(config) -> Layout:
    return Layout(
        levels=len(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        attention=tuple(kind.startswith("CrossAttn") for kind in config["down_block_types"]),
    )


def unet_table(layout: Layout) -> dict[str, str]:
    """Every UNet module of ``layout``: diffusers path -> LDM path (under ``model.diffusion_model.``)."""
    table = dict(UNET_TOP)

    def resnet(diffusers: str, ldm: str) -> None:
        table.update({f"{diffusers}.{d}": f"{ldm}.{c}" for d, c in UNET_RESNET.items()})

    per_level = layout.layers_per_block + 1  # LDM input_blocks: the resnets, then the downsampler
    for i in range(layout.levels):
        for j in range(layout.layers_per_block):
            n = 1 + i * per_level + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            if layout.attention[i]:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < layout.levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * per_level}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")
    for i in range(layout.levels):
        has_attention = layout.attention[layout.levels - 1 - i]
        for j in range(per_level):
            n = i * per_level + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0")
            if has_attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < layout.levels - 1:
            # The upsampler follows the last resnet (and its attention, if any).
            n = i * per_level + per_level - 1
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if has_attention else 1}.conv"
    return table


def vae_table(levels: int, layers_per_block: int) -> dict[str, str]:
    """Every VAE module: diffusers path -> LDM path (under ``first_stage_model.``).

    The LDM decoder numbers its levels from the lowest resolution up, the
    diffusers one in the order they run: ``up_blocks.0`` is ``up.<levels-1>``.
    """
    table = dict(VAE_TOP)

    def resnet(diffusers: str, ldm: str) -> None:
        table.update({f"{diffusers}.{d}": f"{ldm}.{c}" for d, c in VAE_RESNET.items()})

    for part in ("encoder", "decoder"):
        for d, c in VAE_MID.items():
            resnet(f"{part}.{d}", f"{part}.{c}")
        table.update({f"{part}.mid_block.attentions.0.{d}": f"{part}.mid.attn_1.{c}" for d, c in VAE_ATTENTION.items()})
    for i in range(levels):
        for j in range(layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        up = levels - 1 - i
        for j in range(layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}")
        if i < levels - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    return table


def rename(key: str, table: dict[str, str]) -> str:
    """``key`` with its longest module prefix in ``table`` replaced; KeyError when none matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix], *parts[cut:]])
    raise KeyError(key)


def _renamed(tensors: dict[str, torch.Tensor], table: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in tensors.items():
        try:
            out[rename(key, table)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} {what} tensor(s) have no entry in the key map, e.g. {unknown[:3]}")
    return out


def unet_to_ldm(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + k: v for k, v in _renamed(tensors, unet_table(layout), "UNet").items()}


def unet_from_ldm(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    inverse = {c: d for d, c in unet_table(layout).items()}
    return _renamed({k.removeprefix(UNET_PREFIX): v for k, v in tensors.items()}, inverse, "UNet")


def vae_to_ldm(tensors: dict[str, torch.Tensor], levels: int, layers_per_block: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in _renamed(tensors, vae_table(levels, layers_per_block), "VAE").items():
        if ".mid.attn_1." in key and key.rsplit(".", 2)[-2] in VAE_CONV_ATTENTION and key.endswith(".weight"):
            value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + key] = value
    return out


def vae_from_ldm(tensors: dict[str, torch.Tensor], levels: int, layers_per_block: int) -> dict[str, torch.Tensor]:
    inverse = {c: d for d, c in vae_table(levels, layers_per_block).items()}
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix(VAE_PREFIX)
        if ".mid.attn_1." in key and key.rsplit(".", 2)[-2] in VAE_CONV_ATTENTION and key.endswith(".weight"):
            value = value.reshape(value.shape[0], value.shape[1])  # (out, in, 1, 1) -> (out, in)
        out[key] = value
    return _renamed(out, inverse, "VAE")


def clip_to_ldm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x: the transformers CLIP names under ``cond_stage_model.transformer.text_model.``.

    transformers >= 5 state dicts lack the ``text_model.`` level; older ones have it.
    """
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in tensors.items()}


def clip_from_ldm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # position_ids is a buffer SD 1.x files carry from old transformers; the model rebuilds it.
    return {k.removeprefix(CLIP_PREFIX): v for k, v in tensors.items() if not k.endswith("embeddings.position_ids")}


def openclip_to_ldm(tensors: dict[str, torch.Tensor], num_layers: int, prefix: str = OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD 2.x (and SDXL's second encoder, under its own ``prefix``): OpenCLIP names,
    q/k/v fused into ``in_proj`` (rows q, then k, then v)."""
    out = {prefix + c: tensors[d] for d, c in OPENCLIP_TOP.items()}
    for n in range(num_layers):
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for d, c in OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{c}.{kind}"] = tensors[f"{src}{d}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([tensors[f"{src}{p}.{kind}"] for p in OPENCLIP_FUSED])
    expected = 4 + num_layers * 16
    if len(tensors) != expected:
        raise KeyError(f"OpenCLIP text encoder has {len(tensors)} tensors, the map covers {expected}")
    return out


def openclip_from_ldm(tensors: dict[str, torch.Tensor], num_layers: int, prefix: str = OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """The first ``num_layers`` resblocks as transformers CLIP names (see ``openclip_extras`` for the rest)."""
    t = {k.removeprefix(prefix): v for k, v in tensors.items()}
    out = {d: t[c] for d, c in OPENCLIP_TOP.items()}
    for n in range(num_layers):
        src, dst = f"transformer.resblocks.{n}.", f"encoder.layers.{n}."
        for d, c in OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{d}.{kind}"] = t[f"{src}{c}.{kind}"]
        for kind in ("weight", "bias"):
            for proj, part in zip(OPENCLIP_FUSED, t[f"{src}attn.in_proj_{kind}"].chunk(3)):
                out[f"{dst}{proj}.{kind}"] = part.clone()
    return out


def openclip_extras(num_layers: int, hidden: int, intermediate: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The OpenCLIP tensors SD 2 never uses, for a file written without a base file to carry them from.

    SD 2 conditions on the output of resblock ``num_layers - 1`` (the penultimate
    of 24) followed by ``ln_final``, so resblock ``num_layers`` and
    ``text_projection`` are loaded by the UIs but never run. They are written
    as an identity resblock (zero output projections: the residual passes
    through) and an identity projection, so the file has the key set the UIs
    expect and nothing in it is random. ``logit_scale`` (CLIP's contrastive
    temperature, which A1111's loader fills from the file) gets the value CLIP
    training ends at, ln 100 (it is clamped there).
    """
    block = f"{OPENCLIP_PREFIX}transformer.resblocks.{num_layers}."
    zeros = {
        "attn.in_proj_weight": (3 * hidden, hidden), "attn.in_proj_bias": (3 * hidden,),
        "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
        "mlp.c_fc.weight": (intermediate, hidden), "mlp.c_fc.bias": (intermediate,),
        "mlp.c_proj.weight": (hidden, intermediate), "mlp.c_proj.bias": (hidden,),
        "ln_1.bias": (hidden,), "ln_2.bias": (hidden,),
    }  # fmt: skip
    out = {block + name: torch.zeros(shape, dtype=dtype) for name, shape in zeros.items()}
    out |= {block + name: torch.ones(hidden, dtype=dtype) for name in ("ln_1.weight", "ln_2.weight")}
    out[f"{OPENCLIP_PREFIX}text_projection"] = torch.eye(hidden, dtype=dtype)
    out[f"{OPENCLIP_PREFIX}logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=dtype)
    return out
