"""diffusers <-> SGM tensor names of SDXL single-file checkpoints (Stability AI's generative-models layout).

An SDXL file is an SD single file (shared/DESIGN.md, rule 5) with two changes:

- UNet under ``model.diffusion_model.``: the LDM block names of ``ldm_keys.unet_table``
  (three levels, transformer depths 0/2/10 and 10 in the middle, all inside the
  same ``input_blocks.<n>.1`` modules), plus the size/crop conditioning MLP
  ``label_emb.0.0`` / ``label_emb.0.2`` (diffusers ``add_embedding.linear_1/2``).
- Text encoders under ``conditioner.embedders.<i>.``: CLIP ViT-L in transformers
  names (``0.transformer.text_model.*``), and OpenCLIP ViT-bigG (``1.model.*``) in
  OpenCLIP names with q/k/v fused into ``attn.in_proj_*`` (the SD 2 table), its
  ``text_projection`` stored as OpenCLIP uses it (``x @ P``: the transpose of
  transformers' ``text_projection.weight``) and a ``logit_scale``.

The VAE is SD's (``first_stage_model.``, ``ldm_keys.vae_table``). diffusers keeps
every layer of both encoders (SDXL reads the penultimate hidden state of each, and
bigG's last layer feeds the pooled embedding), so nothing is cut as for SD 2; the
file's only tensors without a diffusers counterpart are CLIP-L's
``position_ids`` and bigG's ``logit_scale`` (``sgm_extras``).
"""

from __future__ import annotations

import torch

from sdtune.export import ldm_keys
from sdtune.export.ldm_keys import LOGIT_SCALE, Layout

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
BIGG_PREFIX = "conditioner.embedders.1.model."
EMBEDDERS_PREFIX = "conditioner.embedders."
POSITION_IDS = CLIP_L_PREFIX + "embeddings.position_ids"
BIGG_PROJECTION = BIGG_PREFIX + "text_projection"
BIGG_LOGIT_SCALE = BIGG_PREFIX + "logit_scale"
# transformers' CLIPTextModelWithProjection keeps its encoder under `text_model.`.
TEXT_MODEL = "text_model."

# UNet modules SDXL adds to SD's (diffusers -> SGM): the MLP over the pooled text
# embedding and the Fourier features of the six size/crop numbers.
SDXL_UNET_TOP = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def unet_table(layout: Layout) -> dict[str, str]:
    """Every SDXL UNet module: diffusers path -> SGM path (under ``model.diffusion_model.``)."""
    return ldm_keys.unet_table(layout) | SDXL_UNET_TOP


def module_to_sgm(path: str, table: dict[str, str]) -> str:
    """A diffusers UNet module path as SGM names it (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``); KeyError for a path outside the table."""
    return ldm_keys.rename(path + ".weight", table).removesuffix(".weight")


def unet_to_sgm(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    return {ldm_keys.UNET_PREFIX + k: v for k, v in ldm_keys._renamed(tensors, unet_table(layout), "UNet").items()}


def unet_from_sgm(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    inverse = {c: d for d, c in unet_table(layout).items()}
    return ldm_keys._renamed({k.removeprefix(ldm_keys.UNET_PREFIX): v for k, v in tensors.items()}, inverse, "UNet")


def clip_l_to_sgm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L: transformers names (with or without the ``text_model.`` level) under embedder 0."""
    return {CLIP_L_PREFIX + k.removeprefix(TEXT_MODEL): v for k, v in tensors.items()}


def clip_l_from_sgm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 ``CLIPTextModel`` names; ``position_ids`` is left to ``sgm_extras``."""
    return {k.removeprefix(CLIP_L_PREFIX): v for k, v in tensors.items() if k != POSITION_IDS}


def bigg_to_sgm(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG from a transformers ``CLIPTextModelWithProjection`` state dict."""
    inner = {k.removeprefix(TEXT_MODEL): v for k, v in tensors.items() if k != "text_projection.weight"}
    out = ldm_keys.openclip_to_ldm(inner, num_layers, prefix=BIGG_PREFIX)
    out[BIGG_PROJECTION] = tensors["text_projection.weight"].t().contiguous()
    return out


def bigg_from_sgm(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` names; ``logit_scale`` is left to ``sgm_extras``."""
    out = {TEXT_MODEL + k: v for k, v in ldm_keys.openclip_from_ldm(tensors, num_layers, prefix=BIGG_PREFIX).items()}
    out["text_projection.weight"] = tensors[BIGG_PROJECTION].t().contiguous()
    return out


def sgm_extras(max_positions: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The embedder tensors SDXL never runs, for a file written without a base file to carry them from.

    CLIP-L's ``position_ids`` buffer (0..76, as the original files and ComfyUI's saver
    have it) and bigG's ``logit_scale`` (CLIP's trained temperature, ln 100).
    """
    return {
        POSITION_IDS: torch.arange(max_positions, dtype=torch.int64).unsqueeze(0),
        BIGG_LOGIT_SCALE: torch.tensor(LOGIT_SCALE, dtype=dtype),
    }
