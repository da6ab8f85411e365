"""The sample dataset's world at scale: generated training sets for the tiny trained base.

``datasets/sample`` (``datasets/make_sample.py``) shows the world in 40 images:
flat shapes in named colours at named positions on a solid background, with
captions that say exactly that. A base model trained from scratch needs the
same world in thousands of images, so this module generates them, reproducibly
from a seed, at build time (they are not committed):

* ``scenes(count, seed)``: one shape per 64x64 image, the captions in the
  sample's grammar ("a red circle on the left on a blue background", "red
  circle, left, blue background", ...). One shape/background pair never occurs
  (``HELD_OUT``): the LoRA demo teaches it.
* ``trigger_scenes(count, seed, trigger)``: the LoRA demo's set, only the
  held-out pair, captioned with a trigger word instead of the colours
  ("a zwx circle in the center").

The colour table, positions and phrases are the sample's (tests/test_world.py
checks they match ``datasets/make_sample.py``), so prompts written for one
fit the other. Shapes are drawn without anti-aliasing: an image holds only its
two named colours, which is what the pixel judge (tests/judge.py) is checked on.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from sdtune import atomic

SIDE = 64  # pixels; the tiny model's native size (8x8 latents)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "pink": (240, 120, 180),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
LOW_CONTRAST = {
    frozenset(p)
    for p in [("red", "orange"), ("red", "pink"), ("orange", "yellow"), ("orange", "pink"), ("yellow", "white"),
              ("blue", "purple"), ("green", "gray"), ("purple", "gray"), ("red", "gray"), ("blue", "gray")]
}
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
}
PHRASE = {
    "center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "top left": "in the top left", "top right": "in the top right",
    "bottom left": "in the bottom left", "bottom right": "in the bottom right",
}
KINDS = ("circle", "square", "triangle", "diamond")
HELD_OUT = ("pink", "green")  # (shape colour, background): never in the base set; the LoRA demo's subject
TRIGGER = "zwx"


@dataclass(frozen=True)
class Scene:
    kind: str  # one of KINDS
    colour: str  # the shape's, a key of COLOURS
    position: str  # a key of POSITIONS
    background: str
    size: float  # the shape's extent as a fraction of the side
    caption: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(kind: str, colour: str, position: str, background: str, large: bool, template: int) -> str:
    """One of the sample's four single-shape captions (prose three ways, or tags)."""
    words = " ".join((["large"] if large else []) + [colour, kind])
    noun, where, bg = f"{_article(words)} {words}", PHRASE[position], f"{background} background"
    return [
        f"{noun} {where} on {_article(background)} {bg}",
        f"{noun} {where}, {bg}",
        f"{bg} with {noun} {where}",
        f"{colour} {kind}, {position}, {bg}",
    ][template]


def trigger_caption(kind: str, position: str, trigger: str, template: int) -> str:
    """The LoRA demo's captions: the trigger word stands for the colours."""
    return [f"{_article(trigger)} {trigger} {kind} {PHRASE[position]}", f"{trigger} {kind}, {position}"][template]


def contrasts(a: str, b: str) -> bool:
    return a != b and frozenset((a, b)) not in LOW_CONTRAST


def _shape_size(rng: random.Random, position: str) -> float:
    # At least 0.35 of the side: 3 latent pixels of the 8x8 latent.
    return rng.choice([0.45, 0.55, 0.65]) if position == "center" else rng.choice([0.35, 0.4, 0.45])


def scenes(count: int, seed: int) -> list[Scene]:
    """``count`` single-shape scenes, the same for the same seed; never the ``HELD_OUT`` pair."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        background = rng.choice(list(COLOURS))
        colour = rng.choice([c for c in COLOURS if contrasts(c, background)])
        if (colour, background) == HELD_OUT:
            continue
        position, kind = rng.choice(list(POSITIONS)), rng.choice(KINDS)
        size = _shape_size(rng, position)
        text = caption_for(kind, colour, position, background, size >= 0.55, rng.randrange(4))
        out.append(Scene(kind, colour, position, background, size, text))
    return out


def trigger_scenes(count: int, seed: int, trigger: str = TRIGGER) -> list[Scene]:
    """The LoRA demo's set: the held-out colours, every kind and position, trigger captions."""
    rng = random.Random(seed)
    colour, background = HELD_OUT
    out = []
    for _ in range(count):
        position, kind = rng.choice(list(POSITIONS)), rng.choice(KINDS)
        out.append(Scene(kind, colour, position, background, _shape_size(rng, position),
                         trigger_caption(kind, position, trigger, rng.randrange(2))))
    return out


def render(scene: Scene, side: int = SIDE) -> Image.Image:
    """The scene's pixels: the background and one flat shape, nothing else."""
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    half = scene.size * side / 2
    x0, y0, x1, y1 = (round(v) for v in (fx * side - half, fy * side - half, fx * side + half, fy * side + half))
    fill = COLOURS[scene.colour]
    if scene.kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif scene.kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif scene.kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif scene.kind == "diamond":
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {scene.kind!r}; choose one of {', '.join(KINDS)}")
    return image


TRUTH_FILE = "world.json"  # every image's scene, for judging and tests


def write_dataset(out_dir: str | Path, items: list[Scene]) -> Path:
    """``00000.png`` + ``00000.txt`` per scene and ``world.json`` (the scenes), as one
    folder that appears whole or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.tmp_beside(out_dir)
    tmp.mkdir()
    try:
        for i, scene in enumerate(items):
            render(scene).save(tmp / f"{i:05d}.png", format="PNG", optimize=False, compress_level=6)
            (tmp / f"{i:05d}.txt").write_text(scene.caption + "\n", encoding="utf-8", newline="\n")
        truth = {f"{i:05d}.png": asdict(scene) for i, scene in enumerate(items)}
        (tmp / TRUTH_FILE).write_text(json.dumps(truth, indent=0), encoding="utf-8")
        return atomic.publish_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_truth(folder: str | Path) -> dict[str, Scene]:
    """The scenes ``write_dataset`` recorded, by image file name."""
    raw = json.loads((Path(folder) / TRUTH_FILE).read_text(encoding="utf-8"))
    return {name: Scene(**fields) for name, fields in raw.items()}
