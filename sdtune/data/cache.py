"""Content-addressed caches of VAE latents and frozen text-encoder outputs.

One safetensors file per entry, named by the SHA-256 of everything that
determines it (image bytes + VAE weights + bucket, resize, crop and flip for
latents; token ids + text-encoder weights for text), so a second run, or another
recipe over the same images, finds its entries and encodes nothing again; a
changed image or VAE simply gets a new key. Latents keep the VAE's posterior
mean and std so training can sample from it, as the VAE intends. A small
manifest remembers each image's last key, only to count invalidations.

Every entry carries the SHA-256 of its tensors in its metadata. Before training,
an existing entry counts as a hit only if it opens, holds the expected tensors
(names, shapes, float32), matches its checksum and is finite; a truncated or
flipped one (a full disk, a killed copy, bad storage) is named and encoded again
instead of crashing every run or training on wrong numbers. Training checks the
checksum again each time it reads an entry.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load
from tqdm.auto import tqdm

from sdtune.atomic import remove_stale_temps, save_safetensors, write_text
from sdtune.conditioning import empty_conditioning, time_ids, tokenizers
from sdtune.data.captions import shuffle_tags, tokenize, with_prefix
from sdtune.data.images import load_crop
from sdtune.data.masks import latent_mask, mask_file, mask_key_parts
from sdtune.data.plan import DataPlan, Item
from sdtune.errors import DataError
from sdtune.hashes import sdtune_cache_dir as default_cache_dir  # noqa: F401  (where callers look for it)
from sdtune.hashes import tensors_sha256
from sdtune.models import encode_prompts
from sdtune.sdxl import encode_sdxl_prompts

CACHE_VERSION = "3"  # bump when the entry layout or preprocessing changes (3: checksums in the metadata)
CHECKSUM_KEY = "sdtune_tensors_sha256"  # metadata key: hashes.tensors_sha256 of the entry's tensors


@dataclass
class CacheStats:
    encoded: int = 0  # entries this run computed: misses and rebuilds
    reused: int = 0  # hits: existing entries that passed the check
    invalidated: int = 0  # misses whose image had an entry under another key (its bytes, crop or VAE changed)
    rebuilt: int = 0  # existing entries that failed the check (damaged or unchecked) and were encoded again


def summed(stats: CacheStats, accelerator) -> CacheStats:
    """The whole run's counts: each process counts only the entries it owns (see ``cache_latents``)."""
    counts = accelerator.reduce(torch.tensor(astuple(stats), device=accelerator.device), reduction="sum")
    return CacheStats(*(int(c) for c in counts))


def report_caches(
    latent: CacheStats, text: CacheStats | None, cache_dir: Path, accelerator
) -> tuple[CacheStats, CacheStats | None]:
    """Sum the counts over processes and print them once (with each process's share of
    the encoding when there are several); returns the sums."""
    shares = accelerator.gather(torch.tensor([latent.encoded], device=accelerator.device)).tolist()
    latent = summed(latent, accelerator)
    text = summed(text, accelerator) if text else None
    if accelerator.is_local_main_process:
        rebuilt = f", {latent.rebuilt} rebuilt" if latent.rebuilt else ""
        split = f" ({' + '.join(map(str, shares))} by {len(shares)} processes)" if len(shares) > 1 else ""
        print(f"sdtune: latent cache {latent.encoded} encoded{split}, {latent.reused} reused, {latent.invalidated} invalidated{rebuilt} ({cache_dir})")
        if text:
            print(f"sdtune: text cache {text.encoded} encoded, {text.reused} reused" + (f", {text.rebuilt} rebuilt" if text.rebuilt else ""))
    return latent, text


@dataclass
class Caches:
    """Where a plan's cache entries are, per trained and per held-out item."""

    latents: list[Path]
    validation_latents: list[Path]
    text: list[Path] | None  # None when the text encoder runs in the loop (it trains, or tags are shuffled)
    validation_text: list[Path] | None
    empty_text: Path | None  # the empty caption's entry, for caption dropout
    latent_stats: CacheStats
    text_stats: CacheStats | None
    masks: list[Path] | None = None  # per trained item, with data.masks (held-out images are scored unmasked)


def fill_caches(plan: DataPlan, parts, cache_dir: Path, accelerator, cache_text_outputs: bool) -> Caches:
    """What a run does before step 1 (and ``sdtune cache`` does alone): each process
    checks its share of the latent entries of the trained and held-out views and,
    when the text encoder is frozen, of the captions' outputs (the empty caption's
    too), and with data.masks of the trained views' loss masks, and encodes those
    missing or unusable; then every process waits for the others and the counts are
    printed once."""
    items = plan.train + plan.validation
    shard, show = (accelerator.process_index, accelerator.num_processes), accelerator.is_local_main_process
    if accelerator.is_local_main_process:
        remove_stale_temps(cache_dir)  # entries a killed run was writing
    accelerator.wait_for_everyone()
    latents, latent_stats = cache_latents(items, parts.vae, parts.vae_sha256, cache_dir, accelerator.device, shard=shard, show_progress=show)
    text, text_stats = None, None
    if cache_text_outputs:
        text, text_stats = cache_text(
            [i.caption for i in items] + [""], parts.tokenizer, parts.text_encoder, parts.text_encoder_sha256,
            cache_dir, accelerator.device, shard=shard, show_progress=show,
            tokenizer_2=getattr(parts, "tokenizer_2", None), text_encoder_2=getattr(parts, "text_encoder_2", None),
        )
    masks, mask_stats = None, None
    if plan.masks != "none":  # data.masks: at the VAE's downsampling, as diffusers' pipelines compute it
        scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        masks, mask_stats = cache_masks(plan.train, plan.masks, scale, cache_dir, shard=shard, show_progress=show)
    accelerator.wait_for_everyone()
    latent_stats, text_stats = report_caches(latent_stats, text_stats, cache_dir, accelerator)
    if mask_stats is not None and (mask_stats := summed(mask_stats, accelerator)) and accelerator.is_local_main_process:
        print(f"sdtune: mask cache {mask_stats.encoded} encoded, {mask_stats.reused} reused" + (f", {mask_stats.rebuilt} rebuilt" if mask_stats.rebuilt else ""))
    n = len(plan.train)
    return Caches(
        latents=latents[:n], validation_latents=latents[n:],
        text=text[:n] if text else None, validation_text=text[n : len(items)] if text else None,
        empty_text=text[-1] if text else None, latent_stats=latent_stats, text_stats=text_stats, masks=masks,
    )


def cached_datasets(plan: DataPlan, caches: Caches, parts, shuffle_tags: bool, keep_tokens: int, seed: int,
                    prior_loss_weight: float = 1.0):
    """Training and held-out datasets over the caches (SDXL's with each view's size/crop ids),
    and the empty caption's text parts (token ids when the text encoder runs in the loop).
    Training samples carry their loss weight (``prior_loss_weight`` for DreamBooth class
    images) when there are class images, and their loss mask with data.masks."""
    train_ids, val_ids = time_ids(plan.train, parts), time_ids(plan.validation, parts)
    weights = [prior_loss_weight if i.sample.is_class else 1.0 for i in plan.train]
    extra = {"mask_paths": caches.masks, "loss_weights": weights if any(i.sample.is_class for i in plan.train) else None}
    if caches.text is not None:
        return (
            CachedDataset(caches.latents, text_paths=caches.text, time_ids=train_ids, **extra),
            CachedDataset(caches.validation_latents, text_paths=caches.validation_text, time_ids=val_ids),
            empty_conditioning(parts, read_entry(caches.empty_text)),
        )
    train_set = CachedDataset(
        caches.latents, captions=[i.sample.caption for i in plan.train], **tokenizers(parts),
        prefixes=[i.sample.prefix for i in plan.train], shuffle=shuffle_tags, keep_tokens=keep_tokens, seed=seed, time_ids=train_ids,
        **extra,
    )
    val_set = CachedDataset(
        caches.validation_latents, captions=[i.sample.caption for i in plan.validation], **tokenizers(parts),
        prefixes=[i.sample.prefix for i in plan.validation], time_ids=val_ids,
    )
    return train_set, val_set, empty_conditioning(parts)


def entry_path(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / key[:2] / f"{key}.safetensors"


def _write_entry(tensors: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Save an entry with the checksum of its tensors. Non-finite values are refused:
    they would fail the check and be encoded again on every run."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise DataError(f"{what} came out non-finite, so it was not cached; the model's weights may be damaged (model.path)")
    save_safetensors(tensors, path, metadata={CHECKSUM_KEY: tensors_sha256(tensors)})


def _open_entry(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """An entry's tensors and what is wrong with them: unreadable, no checksum, or not
    the tensors the checksum was taken of (None when they match). Reads the file once."""
    try:
        data = Path(path).read_bytes()
        tensors = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (OSError, ValueError, SafetensorError) as exc:
        return {}, f"unreadable: {exc}"
    checksum = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    if checksum is None:
        return tensors, "no checksum (an older sdtune wrote it, or something else)"
    if tensors_sha256(tensors) != checksum:
        return tensors, "checksum mismatch: its bytes changed after it was written"
    return tensors, None


def _entry_problem(path: Path, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with an existing entry, or None when it is sound: it opens, its
    checksum matches, it holds exactly the float32 tensors ``shapes`` names, all finite."""
    tensors, problem = _open_entry(path)
    if problem:
        return problem
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != shapes:
        return f"tensors {found}, expected {shapes}"
    if any(t.dtype != torch.float32 for t in tensors.values()):
        return f"dtypes {sorted({str(t.dtype) for t in tensors.values()})}, expected float32"
    if not all(np.isfinite(t.numpy()).all() for t in tensors.values()):  # numpy: a third of torch's cost on small tensors
        return "non-finite values"
    return None


def read_entry(path: Path) -> dict[str, torch.Tensor]:
    """An entry's tensors, checked against their checksum; what training reads every step."""
    tensors, problem = _open_entry(path)
    if problem:
        raise DataError(f"cache entry {path} is damaged ({problem}); run again: the next run checks the cache and rebuilds it")
    return tensors


def _sound(path: Path, shapes: dict[str, tuple[int, ...]], stats: CacheStats) -> bool:
    """Whether an existing entry passes the check (a hit); a failing one is named and counted for rebuilding."""
    problem = _entry_problem(path, shapes)
    if problem is None:
        stats.reused += 1
        return True
    print(f"sdtune: cache entry {path} is unusable ({problem}); it will be rebuilt", file=sys.stderr)
    stats.rebuilt += 1
    return False


def _key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def latent_key(item: Item, vae_id: str) -> str:
    """Everything the latent depends on: the image bytes, the VAE, and the bucket, resize, crop and flip."""
    crop = item.crop
    geometry = f"{crop.bucket[0]}x{crop.bucket[1]}|{crop.resized[0]}x{crop.resized[1]}|{crop.left},{crop.top}|{int(crop.flip)}"
    return _key("latent", CACHE_VERSION, item.sha256, vae_id, geometry)


def cache_latents(
    items: list[Item],
    vae,
    vae_id: str,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 8,
    shard: tuple[int, int] = (0, 1),
    show_progress: bool = True,
) -> tuple[list[Path], CacheStats]:
    """Make sure every item has a sound latent entry; return their paths (in ``items`` order).

    Repeats share one entry. With ``shard=(rank, world)`` each distinct entry belongs
    to one process (every ``world``-th, from ``rank``): only that process checks it
    and, when it is missing or fails the check, encodes it. So no process reads a
    file another is rewriting and none waits for another here; the caller waits for
    all of them before training reads. The counts are this process's share
    (``summed`` adds them up).
    """
    rank, world = shard
    stats = CacheStats()
    manifest_path = Path(cache_dir) / "manifests" / f"latents-{vae_id[:16]}.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling, as diffusers' pipelines compute it
    paths, todo, seen, current = [], [], set(), {}
    for item in items:
        key = latent_key(item, vae_id)
        path = entry_path(cache_dir, "latents", key)
        paths.append(path)
        if key in seen:
            continue
        seen.add(key)
        view = f"{item.sample.name}|flip={int(item.crop.flip)}"
        current[view] = key
        if (len(seen) - 1) % world != rank:
            continue
        width, height = item.crop.bucket
        shape = (vae.config.latent_channels, height // scale, width // scale)
        if path.is_file():
            if _sound(path, {"mean": shape, "std": shape}, stats):
                continue
        elif manifest.get(view, key) != key:
            stats.invalidated += 1
        todo.append((item, path))
    # One batch holds one bucket: the pixel tensors must share a size.
    todo.sort(key=lambda job: job[0].crop.bucket)
    if todo:  # an all-hit run leaves the VAE where it is
        vae = vae.to(device)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not show_progress or not todo)
    with torch.no_grad():
        for chunk in _same_bucket_chunks(todo, batch_size):
            pixels = torch.stack([load_crop(item.sample.read(), item.crop) for item, _ in chunk])
            posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
            for i, (item, path) in enumerate(chunk):
                latent = {"mean": posterior.mean[i].float(), "std": posterior.std[i].float()}
                _write_entry(latent, path, f"the VAE's latent of {item.sample.name}")
            stats.encoded += len(chunk)
            bar.update(len(chunk))
    bar.close()
    if rank == 0 and current.items() - manifest.items():
        write_text(manifest_path, json.dumps(manifest | current, sort_keys=True))
    return paths, stats


def cache_masks(
    items: list[Item], mode: str, scale: int, cache_dir: Path, shard: tuple[int, int] = (0, 1), show_progress: bool = True
) -> tuple[list[Path], CacheStats]:
    """Make sure every item has a sound loss-mask entry (data.masks, ``masks.latent_mask``);
    return their paths. Keyed by the mask file's bytes (the image's for ``alpha``) and the
    view's geometry; sharded, checked and counted like ``cache_latents``."""
    rank, world = shard
    stats, mask_bytes, paths, todo, seen = CacheStats(), {}, [], [], set()
    for item in items:
        if mode == "files" and item.sample.name not in mask_bytes:
            file = mask_file(item.sample)  # none beside a class image: it trains unmasked (masks.check_mask)
            mask_bytes[item.sample.name] = file.read_bytes() if file.is_file() else b""
        source = hashlib.sha256(mask_bytes[item.sample.name]).hexdigest() if mode == "files" else item.sha256
        key = _key(*mask_key_parts(item, mode, source, scale))
        path = entry_path(cache_dir, "masks", key)
        paths.append(path)
        if key in seen:
            continue
        seen.add(key)
        if (len(seen) - 1) % world != rank:  # each distinct entry belongs to one process, as in cache_latents
            continue
        width, height = item.crop.bucket
        if path.is_file() and _sound(path, {"mask": (1, height // scale, width // scale)}, stats):
            continue
        todo.append((item, path))
    for item, path in tqdm(todo, desc="caching masks", unit="img", disable=not show_progress or not todo):
        _write_entry({"mask": latent_mask(item, mode, scale, mask_bytes.get(item.sample.name))}, path, f"the loss mask of {item.sample.name}")
        stats.encoded += 1
    return paths, stats


def _same_bucket_chunks(jobs: list, size: int):
    start = 0
    while start < len(jobs):
        bucket = jobs[start][0].crop.bucket
        end = start
        while end < len(jobs) and end - start < size and jobs[end][0].crop.bucket == bucket:
            end += 1
        yield jobs[start:end]
        start = end


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
    tokenizer_2=None,
    text_encoder_2=None,
) -> tuple[list[Path], CacheStats]:
    """Make sure every caption has a sound cached text-encoder output; return their
    paths. Sharded and counted like ``cache_latents``. With SDXL's second tokenizer and
    encoder, an entry holds both encoders' hidden states side by side and bigG's pooled
    embedding (``sdxl.encode_sdxl_prompts``), keyed by both token rows."""
    rank, world = shard
    stats = CacheStats()
    unique = list(dict.fromkeys(captions))  # the same caption twice (repeats) is tokenized and encoded once
    rows = tokenize(tokenizer, unique)
    rows_2 = tokenize(tokenizer_2, unique) if text_encoder_2 is not None else [None] * len(unique)
    shapes = {"hidden_states": (rows.shape[1], text_encoder.config.hidden_size)}
    if text_encoder_2 is not None:
        shapes = {"hidden_states": (rows.shape[1], text_encoder.config.hidden_size + text_encoder_2.config.hidden_size),
                  "pooled": (text_encoder_2.config.projection_dim,)}
    paths_of, todo, seen = {}, [], set()
    for caption, row, row_2 in zip(unique, rows, rows_2):
        ids = [row.numpy().tobytes()] + ([row_2.numpy().tobytes()] if row_2 is not None else [])
        path = entry_path(cache_dir, "text", _key("text", CACHE_VERSION, text_encoder_id, *ids))
        paths_of[caption] = path
        if path in seen:
            continue  # different captions can share token ids (the part past 77 tokens is cut)
        seen.add(path)
        if (len(seen) - 1) % world != rank:
            continue
        if path.is_file() and _sound(path, shapes, stats):
            continue
        todo.append((caption, row, row_2, path))
    paths = [paths_of[caption] for caption in captions]
    if todo:
        text_encoder = text_encoder.to(device)
        text_encoder_2 = text_encoder_2.to(device) if text_encoder_2 is not None else None
    bar = tqdm(total=len(todo), desc="caching text", unit="caption", disable=not show_progress or not todo)
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            ids = torch.stack([row for _, row, _, _ in chunk]).to(device)
            if text_encoder_2 is None:
                outputs = {"hidden_states": encode_prompts(text_encoder, ids)}
            else:
                ids_2 = torch.stack([row_2 for _, _, row_2, _ in chunk]).to(device)
                outputs = dict(zip(("hidden_states", "pooled"), encode_sdxl_prompts(text_encoder, text_encoder_2, ids, ids_2)))
            for i, (caption, _, _, path) in enumerate(chunk):
                entry = {name: output[i].float() for name, output in outputs.items()}
                _write_entry(entry, path, f"the text encoder's output for the caption {caption!r}")
            stats.encoded += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return paths, stats


class CachedDataset(torch.utils.data.Dataset):
    """Training samples read from the caches, each entry checked against its checksum
    as it is read (``read_entry``): latent mean/std, and either the cached
    text-encoder output or token ids (when the text encoder runs in the loop: it
    trains, or tags are shuffled anew each epoch). SDXL's samples add the pooled
    embedding (or the second tokenizer's ids) and each view's size/crop ``time_ids``.

    Indexed by ``(item, epoch)`` pairs from :class:`BucketBatchSampler`; the tag
    order of an item in an epoch depends only on ``seed``, item and epoch, so it is
    the same with any number of workers.
    """

    def __init__(
        self,
        latent_paths: list[Path],
        text_paths: list[Path] | None = None,
        captions: list[str] | None = None,
        tokenizer=None,
        prefixes: list[str] | None = None,
        shuffle: bool = False,
        keep_tokens: int = 0,
        seed: int = 0,
        tokenizer_2=None,
        time_ids: list[torch.Tensor] | None = None,
        mask_paths: list[Path] | None = None,
        loss_weights: list[float] | None = None,
    ):
        if (text_paths is None) == (captions is None):
            raise ValueError("give either cached text paths or captions")
        self.latent_paths, self.text_paths, self.captions = latent_paths, text_paths, captions
        self.tokenizer, self.prefixes = tokenizer, prefixes or [""] * len(latent_paths)
        self.tokenizer_2, self.time_ids = tokenizer_2, time_ids
        self.shuffle, self.keep_tokens, self.seed = shuffle, keep_tokens, seed
        self.mask_paths, self.loss_weights = mask_paths, loss_weights

    def __len__(self) -> int:
        return len(self.latent_paths)

    def caption(self, index: int, epoch: int) -> str:
        caption, prefix = self.captions[index], self.prefixes[index]
        if self.shuffle:
            return shuffle_tags(caption, self.keep_tokens, random.Random(f"{self.seed}:{epoch}:{index}"), prefix)
        return with_prefix(caption, prefix)

    def __getitem__(self, draw: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = draw if isinstance(draw, tuple) else (draw, 0)
        item = read_entry(self.latent_paths[index])
        if self.text_paths is not None:
            text = read_entry(self.text_paths[index])
            item["encoder_hidden_states"] = text["hidden_states"]
            if "pooled" in text:
                item["pooled"] = text["pooled"]
        else:
            caption = self.caption(index, epoch)
            item["input_ids"] = tokenize(self.tokenizer, [caption])[0]
            if self.tokenizer_2 is not None:
                item["input_ids_2"] = tokenize(self.tokenizer_2, [caption])[0]
        if self.time_ids is not None:
            item["time_ids"] = self.time_ids[index]
        if self.mask_paths is not None:
            item["mask"] = read_entry(self.mask_paths[index])["mask"]
        if self.loss_weights is not None:
            item["loss_weight"] = torch.tensor(self.loss_weights[index], dtype=torch.float32)
        return item
