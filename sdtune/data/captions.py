"""Captions to token ids: prefix, tag shuffling, truncation, and dropout for CFG."""

from __future__ import annotations

import random

import torch
from transformers import CLIPTokenizer


def with_prefix(caption: str, prefix: str) -> str:
    """The source's trigger word / prefix in front, as its own comma-separated tag."""
    if not prefix:
        return caption
    return f"{prefix}, {caption}" if caption else prefix


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random, prefix: str = "") -> str:
    """Shuffle the comma-separated tags of ``caption``, keeping the first ``keep_tokens``
    tags (kohya's name) and the source prefix in place, so a trigger word stays first.

    Shuffling teaches the model that tag order carries no meaning; a caption
    without commas is one tag and comes back unchanged.
    """
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return with_prefix(", ".join(fixed + rest), prefix)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for CLIP), as SD's pipelines do."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def truncated(tokenizer: CLIPTokenizer, captions: list[str]) -> list[int]:
    """Indices of the captions longer than the tokenizer's window (77 tokens with
    start and end), whose ends the text encoder never sees."""
    lengths = tokenizer(captions, truncation=False, padding=False, verbose=False)["input_ids"]
    return [i for i, ids in enumerate(lengths) if len(ids) > tokenizer.model_max_length]


def drop_captions(conditioning: torch.Tensor, empty: torch.Tensor, probability: float, generator=None) -> torch.Tensor:
    """Replace each sample's conditioning by the empty caption's with ``probability``.

    Works on token ids (``B x 77``) or cached text-encoder outputs (``B x 77 x D``);
    ``empty`` is the same for one sample, broadcast over the batch.
    """
    return drop_caption_parts({"text": conditioning}, {"text": empty}, probability, generator)["text"]


def drop_caption_parts(
    parts: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], probability: float, generator=None
) -> dict[str, torch.Tensor]:
    """``drop_captions`` for a caption held in several tensors (SDXL: both encoders' hidden
    states and the pooled embedding, or both tokenizers' ids): one draw per sample drops
    all its parts together, so a dropped caption leaves no trace in any of them."""
    if probability <= 0:
        return parts
    first = next(iter(parts.values()))
    keep = torch.rand(first.shape[0], device=first.device, generator=generator) >= probability
    return {
        name: torch.where(keep.view(-1, *([1] * (part.ndim - 1))), part, empty[name].to(part.device, part.dtype))
        for name, part in parts.items()
    }
