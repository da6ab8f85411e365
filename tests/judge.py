"""A judge for generated images of the sample's world: pure pixel statistics, no model.

It reads one image the way a person checks a caption: which named colour fills
the border (the background), which named colour the pixels that stand out from
it have (the shape), and where their centre lies (the position). Colours are
named by the nearest entry of ``sdtune.world.COLOURS`` in RGB; positions by the
nearest of ``sdtune.world.POSITIONS``.

tests/test_world.py checks it on the generator's ground truth (right on every
real image, wrong-colour and empty images fail); the tests of the trained base
and its LoRA use it on what the models draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtune.world import COLOURS, POSITIONS, Scene

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)
_XY = np.array(list(POSITIONS.values()))
BORDER = 1 / 16  # the ring read as background: shapes stay further in (sizes <= 0.45 off-centre)
MIN_AREA = 0.02  # fewer pixels than this standing out from the background: no shape
MIN_CONTRAST = 60.0  # RGB distance from the background at which a pixel stands out


@dataclass(frozen=True)
class Judgement:
    background: str
    colour: str | None  # None: nothing stands out from the background
    position: str | None
    area: float  # fraction of the image taken by the shape
    contrast: float  # mean RGB distance of the shape's pixels from the background's


def name_colours(pixels: np.ndarray) -> np.ndarray:
    """Index into ``COLOURS`` of the nearest named colour of each RGB pixel (..., 3)."""
    distance = ((pixels[..., None, :] - _RGB) ** 2).sum(-1)
    return distance.argmin(-1)


def judge(image: Image.Image) -> Judgement:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width, _ = pixels.shape
    ring = np.zeros((height, width), dtype=bool)
    b = max(1, round(min(height, width) * BORDER))
    ring[:b], ring[-b:], ring[:, :b], ring[:, -b:] = True, True, True, True
    labels = name_colours(pixels)
    background = np.bincount(labels[ring], minlength=len(_NAMES)).argmax()
    bg_rgb = pixels[ring & (labels == background)].mean(0)
    distance = np.sqrt(((pixels - bg_rgb) ** 2).sum(-1))
    # The shape: pixels far from the background, at least half as far as the farthest,
    # so blurred edges (mixtures of the two colours) do not vote.
    region = distance > max(MIN_CONTRAST, 0.5 * distance.max())
    area = float(region.mean())
    if area < MIN_AREA:
        return Judgement(_NAMES[background], None, None, area, 0.0)
    colour = np.bincount(labels[region], minlength=len(_NAMES)).argmax()
    ys, xs = np.nonzero(region)
    centre = np.array([(xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height])
    position = list(POSITIONS)[int(((_XY - centre) ** 2).sum(-1).argmin())]
    return Judgement(_NAMES[background], _NAMES[colour], position, area, float(distance[region].mean()))


def verdict(judgement: Judgement, scene: Scene | dict) -> dict[str, bool]:
    """Which parts of ``scene`` (a ``Scene`` or a dict with its colour, background and
    position) the judged image agrees with; ``all``: colour and background both."""
    want = scene if isinstance(scene, dict) else {"colour": scene.colour, "background": scene.background,
                                                  "position": scene.position}
    colour = judgement.colour == want["colour"]
    background = judgement.background == want["background"]
    return {"colour": colour, "background": background, "position": judgement.position == want.get("position"),
            "all": colour and background}


def rates(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    """Fraction of images judged right, per part."""
    return {key: sum(v[key] for v in verdicts) / len(verdicts) for key in verdicts[0]}
