"""What the UNet is conditioned on, SD 1/2 and SDXL alike.

A batch's text part is either cached encoder outputs (``encoder_hidden_states``, and
SDXL's ``pooled``) or token ids (``input_ids``, and SDXL's ``input_ids_2``) for
encoders that run in the loop. It becomes the UNet's ``encoder_hidden_states`` and,
for SDXL, its ``added_cond_kwargs``: bigG's pooled embedding and each view's
size/crop numbers (``time_ids``, made from the data plan, never cached).
"""

from __future__ import annotations

import torch

from sdtune.data.captions import tokenize
from sdtune.data.plan import Item, size_conditioning
from sdtune.models import encode_prompts
from sdtune.sdxl import SdxlComponents, add_time_ids

TEXT_KEYS = ("encoder_hidden_states", "pooled", "input_ids", "input_ids_2")


def text_part(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` that carry its captions."""
    return {key: batch[key] for key in TEXT_KEYS if key in batch}


def unet_conditioning(
    text: dict[str, torch.Tensor], encoder: torch.nn.Module | None = None, time_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """``(encoder_hidden_states, extra UNet keyword arguments)``: none for SD 1/2, SDXL's
    ``added_cond_kwargs`` otherwise. ``encoder`` (``sdxl.text_encoders``) runs on token ids;
    without it ``text`` holds cached outputs."""
    if encoder is None:
        hidden, pooled = text["encoder_hidden_states"], text.get("pooled")
    elif "input_ids_2" in text:
        hidden, pooled = encoder(text["input_ids"], text["input_ids_2"])
    else:
        hidden, pooled = encode_prompts(encoder, text["input_ids"]), None
    if pooled is None:
        return hidden, {}
    if time_ids is None:
        raise ValueError("SDXL's UNet needs each sample's size/crop ids (time_ids) with its pooled text embedding")
    return hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(hidden.device)}}


def tokenizers(parts) -> dict:
    """The tokenizer keyword arguments of ``CachedDataset`` for ``parts``."""
    return {"tokenizer": parts.tokenizer, "tokenizer_2": parts.tokenizer_2 if isinstance(parts, SdxlComponents) else None}


def empty_conditioning(parts, cached: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The empty caption's text part, which caption dropout puts in: its ``cached`` entry's
    outputs (SDXL's pooled embedding too), or its token ids when the encoders run in the loop."""
    if cached is not None:
        return {"encoder_hidden_states": cached["hidden_states"]} | ({"pooled": cached["pooled"]} if "pooled" in cached else {})
    found = tokenizers(parts)
    return {"input_ids": tokenize(found["tokenizer"], [""])[0]} | (
        {"input_ids_2": tokenize(found["tokenizer_2"], [""])[0]} if found["tokenizer_2"] is not None else {}
    )


def time_ids(items: list[Item], parts) -> list[torch.Tensor] | None:
    """SDXL: each view's ``add_time_ids`` from its place in the data plan; None for SD 1/2."""
    if not isinstance(parts, SdxlComponents):
        return None
    return [add_time_ids(*size_conditioning(item)) for item in items]
