"""Turn an image file into the square, normalised tensor the VAE encodes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps


def load_square(data: bytes | str, resolution: int) -> torch.Tensor:
    """Decode, upright (EXIF), RGB, resize the shorter side to ``resolution``,
    center-crop to a square; returns a ``3 x res x res`` float tensor in [-1, 1]."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (not black, PIL's default)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
