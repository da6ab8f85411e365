"""Loss masks (data.masks): where in an image the loss counts.

``files``: a grayscale ``<stem>_mask.png`` beside each image (white: trained, black:
ignored, grey: in between; an RGB mask counts by its luminance). ``alpha``: the
image's own alpha channel (an image without one is trained everywhere). DreamBooth
class images without a mask file train unmasked.

A mask goes through the same geometry as its image (upright size, the resize to the
crop's ``resized``, the bucket cut, the mirror), then is area-averaged onto the latent
grid, so a latent cell's weight is the share of its pixels that count. Masks are cached
like latents (``cache.cache_masks``): one checked safetensors entry per view, keyed by
the mask's own bytes (the image's bytes for ``alpha``) and the geometry, so a changed
mask file gets a new entry and never meets a stale one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtune.data.images import ImageInfo, to_rgb
from sdtune.data.sources import Problem, Sample
from sdtune.errors import DataError

MASK_SUFFIX = "_mask.png"
MASK_VERSION = "1"  # bump when the mask preprocessing changes
SHAPE_TOLERANCE = 0.01  # a mask whose aspect ratio is off by more than this is not the image's


def mask_file(sample: Sample) -> Path:
    path = Path(sample.name)
    return path.with_name(path.stem + MASK_SUFFIX)


def is_mask_file(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def without_mask_files(samples: list[Sample], problems: list[Problem]) -> tuple[list[Sample], list[Problem]]:
    """With data.masks: files, the ``*_mask.png`` files a folder scan found are masks, not
    training images: drop them, and the problems (no caption, ...) reported about them."""
    return [s for s in samples if not is_mask_file(s.name)], [p for p in problems if not is_mask_file(p.name)]


def check_mask(sample: Sample, info: ImageInfo) -> Problem | None:
    """What is wrong with the mask file of an image (data.masks: files), or None. A mask
    of another size but the image's shape is resized to the image; another shape is a problem."""
    if not Path(sample.name).is_file():
        raise DataError(f"data.masks: files reads <stem>{MASK_SUFFIX} beside each image file, and {sample.name} is not a "
                        "file (a datasets row); use data.masks: alpha, or a folder of images")
    path = mask_file(sample)
    if not path.is_file():  # DreamBooth class images rarely come with masks: they train unmasked
        return None if sample.is_class else Problem(sample.name, "no_mask", f"no {path.name}")
    try:
        with Image.open(path) as mask:
            mask.load()  # decodes every pixel: a truncated mask fails here, not in the cache
            width, height = ImageOps.exif_transpose(mask).size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return Problem(sample.name, "bad_mask", f"{path.name} cannot be read: {exc}")
    if abs((width / height) / (info.width / info.height) - 1) > SHAPE_TOLERANCE:
        return Problem(sample.name, "bad_mask", f"{path.name} is {width}x{height}, the image {info.width}x{info.height}: "
                                                "another shape; save the mask at the image's size")
    return None


def _mask_image(item, mode: str, mask_bytes: bytes | None) -> Image.Image:
    """The mask as an 8-bit grayscale image of the upright image's size (all white for
    a class image without a mask file: ``mask_bytes`` empty)."""
    if mode == "files" and not mask_bytes:
        mask = Image.new("L", item.size, 255)
    elif mode == "files":
        with Image.open(io.BytesIO(mask_bytes)) as image:
            mask = to_rgb(ImageOps.exif_transpose(image)).convert("L")
    else:
        with Image.open(io.BytesIO(item.sample.read())) as image:
            image = ImageOps.exif_transpose(image)
            has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
            mask = image.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", image.size, 255)
    if mask.size != item.size:
        mask = mask.resize(item.size, Image.Resampling.BILINEAR)
    return mask


def latent_mask(item, mode: str, scale: int, mask_bytes: bytes | None = None) -> torch.Tensor:
    """``1 x h x w`` in [0, 1] on the latent grid of ``item``'s bucket (``scale``: the VAE's
    downsampling): the image's resize, cut and mirror, then the mean over each cell's pixels."""
    crop = item.crop
    mask = _mask_image(item, mode, mask_bytes)
    if mask.size != crop.resized:
        mask = mask.resize(crop.resized, Image.Resampling.LANCZOS)  # as load_crop resizes the image
    width, height = crop.bucket
    mask = mask.crop((crop.left, crop.top, crop.left + width, crop.top + height))
    if crop.flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32).copy())[None, None] / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(pixels, (height // scale, width // scale))[0]


def mask_key_parts(item, mode: str, source_sha256: str, scale: int) -> tuple[str, ...]:
    """What a cached mask depends on: the mask's bytes (the image's, for ``alpha``), the
    image's size, the bucket, resize, cut and mirror, and the latent grid."""
    crop = item.crop
    geometry = (f"{item.size[0]}x{item.size[1]}|{crop.bucket[0]}x{crop.bucket[1]}|{crop.resized[0]}x{crop.resized[1]}|"
                f"{crop.left},{crop.top}|{int(crop.flip)}|{scale}")
    return ("mask", MASK_VERSION, mode, source_sha256, geometry)
