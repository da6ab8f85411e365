"""Image files to the tensors the VAE encodes: check, upright, RGB, resize, crop, flip."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

# EXIF orientations that turn the image by 90 degrees (its stored width is its height).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_SRGB = ImageCms.createProfile("sRGB")


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed, after the EXIF orientation
    height: int


@dataclass(frozen=True)
class Crop:
    """Where a bucket's pixels come from: resize the upright image to ``resized``,
    cut ``bucket`` out at ``(left, top)``, mirror if ``flip``."""

    bucket: tuple[int, int]  # width, height
    resized: tuple[int, int]
    left: int
    top: int
    flip: bool = False


def inspect_image(data: bytes) -> ImageInfo | tuple[str, str]:
    """The upright size of an encoded image, or ``(problem kind, detail)``.

    Decodes every pixel: a truncated file opens fine and fails only there, and
    finding that out at step 40 is what this check exists to prevent.
    """
    if not data:
        return ("empty", "0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(0x0112, 1)
            image.load()
            width, height = image.size
    except Image.UnidentifiedImageError:
        return ("not_image", "not an image Pillow can read")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return ("unreadable", str(exc) or type(exc).__name__)
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width, height)


def load_crop(data: bytes, crop: Crop) -> torch.Tensor:
    """Decode, upright (EXIF), RGB, resize, crop and maybe mirror: ``3 x H x W`` in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        image = to_rgb(ImageOps.exif_transpose(image))
        if image.size != crop.resized:
            image = image.resize(crop.resized, Image.Resampling.LANCZOS)
        width, height = crop.bucket
        image = image.crop((crop.left, crop.top, crop.left + width, crop.top + height))
        if crop.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def center_crop(info: ImageInfo, bucket: tuple[int, int], flip: bool = False) -> Crop:
    return place_crop(info, bucket, 0.5, 0.5, flip)


def place_crop(info: ImageInfo, bucket: tuple[int, int], x: float, y: float, flip: bool = False) -> Crop:
    """Scale the image to just cover ``bucket`` and put the cut at fractions ``x, y``
    (0.5, 0.5 is the center) of the room left over."""
    width, height = bucket
    scale = max(width / info.width, height / info.height)
    resized = (max(width, round(info.width * scale)), max(height, round(info.height * scale)))
    left = int((resized[0] - width) * x)
    top = int((resized[1] - height) * y)
    return Crop(bucket, resized, left, top, flip)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit sRGB, with any transparency composited on white (not black, PIL's default).

    Handles what ``convert("RGB")`` gets wrong: 16-bit and 32-bit grayscale (PIL
    clips them to white instead of scaling), and colour profiles (CMYK and wide-gamut
    files carry one; ignoring it shifts every colour).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode != "F" else max(float(array.max()), 1.0)
        if image.mode == "I" and array.max() <= 255:
            peak = 255.0  # 8-bit values stored in a 32-bit container
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    profile = image.info.get("icc_profile")
    if profile and image.mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        image = _to_srgb(image, profile)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    source_mode = {"RGBA": "RGB", "LA": "L"}.get(image.mode, image.mode)
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(image.convert(source_mode), source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # a broken profile: use the pixels as they are, as viewers do
    if alpha is not None:
        converted.putalpha(alpha)
    return converted
