"""Content-addressed caches of VAE latents and frozen text-encoder outputs.

One safetensors file per entry, named by the SHA-256 of everything that
determines it (image bytes + VAE weights + resolution for latents; token ids +
text-encoder weights for text), so a second run, or another recipe over the
same images, finds its entries and encodes nothing again; a changed image or
VAE simply gets a new key. Latents keep the VAE's posterior mean and std so
training can sample from it, as the VAE intends.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sdtune.atomic import save_safetensors
from sdtune.data.captions import tokenize
from sdtune.data.images import load_square
from sdtune.models import encode_prompts

CACHE_VERSION = "1"  # bump when the entry layout or preprocessing changes


@dataclass
class CacheStats:
    encoded: int = 0
    reused: int = 0


def default_cache_dir() -> Path:
    if os.environ.get("SDTUNE_CACHE"):
        return Path(os.environ["SDTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdtune"


def entry_path(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / key[:2] / f"{key}.safetensors"


def _key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def cache_latents(
    images: list[Path],
    vae,
    vae_id: str,
    resolution: int,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 8,
    shard: tuple[int, int] = (0, 1),
    show_progress: bool = True,
) -> tuple[list[Path], CacheStats]:
    """Make sure every image has a latent entry; return their paths (in ``images`` order).

    With ``shard=(rank, world)`` this process encodes only its share of the
    missing entries; the caller waits for all processes before reading.
    """
    stats = CacheStats()
    paths, missing = [], []
    for image in images:
        key = _key("latent", CACHE_VERSION, hashlib.sha256(image.read_bytes()).hexdigest(), vae_id, str(resolution))
        path = entry_path(cache_dir, "latents", key)
        paths.append(path)
        if path.is_file():
            stats.reused += 1
        else:
            missing.append((image, path))
    rank, world = shard
    todo = missing[rank::world]
    vae = vae.to(device)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not show_progress or not todo)
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            pixels = torch.stack([load_square(image.read_bytes(), resolution) for image, _ in chunk])
            posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
            for i, (_, path) in enumerate(chunk):
                save_safetensors({"mean": posterior.mean[i].float(), "std": posterior.std[i].float()}, path)
            stats.encoded += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return paths, stats


def cache_text(
    captions: list[str],
    tokenizer,
    text_encoder,
    text_encoder_id: str,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 32,
    shard: tuple[int, int] = (0, 1),
    show_progress: bool = True,
) -> tuple[list[Path], CacheStats]:
    """Make sure every caption has a cached text-encoder output; return their paths."""
    stats = CacheStats()
    ids = tokenize(tokenizer, captions)
    paths, missing, seen = [], [], set()
    for row in ids:
        path = entry_path(cache_dir, "text", _key("text", CACHE_VERSION, text_encoder_id, row.numpy().tobytes()))
        paths.append(path)
        if path in seen:
            continue  # the same caption twice is encoded once
        seen.add(path)
        if path.is_file():
            stats.reused += 1
        else:
            missing.append((row, path))
    rank, world = shard
    todo = missing[rank::world]
    text_encoder = text_encoder.to(device)
    bar = tqdm(total=len(todo), desc="caching text", unit="caption", disable=not show_progress or not todo)
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            hidden = encode_prompts(text_encoder, torch.stack([row for row, _ in chunk]).to(device))
            for i, (_, path) in enumerate(chunk):
                save_safetensors({"hidden_states": hidden[i].float()}, path)
            stats.encoded += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return paths, stats


class CachedDataset(torch.utils.data.Dataset):
    """Training samples read from the caches: latent mean/std, and either the
    cached text-encoder output or the token ids (when the text encoder trains)."""

    def __init__(self, latent_paths: list[Path], text_paths: list[Path] | None = None, input_ids=None):
        if (text_paths is None) == (input_ids is None):
            raise ValueError("give either cached text paths or token ids")
        self.latent_paths, self.text_paths, self.input_ids = latent_paths, text_paths, input_ids

    def __len__(self) -> int:
        return len(self.latent_paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = load_file(self.latent_paths[index])
        if self.text_paths is not None:
            item["encoder_hidden_states"] = load_file(self.text_paths[index])["hidden_states"]
        else:
            item["input_ids"] = self.input_ids[index]
        return item
