"""Captions to token ids, and caption dropout for classifier-free guidance."""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for CLIP), as SD's pipelines do."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def drop_captions(conditioning: torch.Tensor, empty: torch.Tensor, probability: float, generator=None) -> torch.Tensor:
    """Replace each sample's conditioning by the empty caption's with ``probability``.

    Works on token ids (``B x 77``) or cached text-encoder outputs (``B x 77 x D``);
    ``empty`` is the same for one sample, broadcast over the batch.
    """
    if probability <= 0:
        return conditioning
    keep = torch.rand(conditioning.shape[0], device=conditioning.device, generator=generator) >= probability
    keep = keep.view(-1, *([1] * (conditioning.ndim - 1)))
    return torch.where(keep, conditioning, empty.to(conditioning.device, conditioning.dtype))
