"""Generate the bundled sample dataset of captioned images.

Usage::

    python datasets/make_sample.py [OUT_DIR]     # default: datasets/sample

Writes 40 small images (``000.png`` ... ``039.png``; a few are ``.jpg``), each
with a same-stem ``.txt`` caption. Every image is a solid background with one
or two flat shapes (circle, square, triangle, diamond, horizontal or vertical
stripe) in named colours at named positions, and the caption says exactly that,
e.g. "a red circle on the left and a blue square on the right, on a yellow
background" or, tag style, "green triangle, center, white background".

Why it exists: sdtune needs a tiny dataset that ships with the repo, so that
tests and smoke runs can train without downloading anything, and whose
captions are verifiably true, so a short fine-tune can be judged by eye
("does the prompt 'a red circle on the left' give a red circle on the left?").

Design points:

* Sizes and aspect ratios vary (square, landscape, portrait, one with an odd
  crop margin) to exercise resize and center-crop. Training resizes the shorter
  side and keeps the largest centered square, so every shape lies inside that
  central square (with a margin) and positions are described relative to it;
  the parts outside the square are plain background. The captions therefore
  stay true after the crop.
* Shapes are at least 0.3 of the square's side, so they stay visible at 64x64.
* Shapes are drawn without anti-aliasing, so PNGs hold only the named colours.
* Output is byte-identical on every run: a fixed ``random.Random`` seed, fixed
  save options and no timestamps or other metadata. (Bytes are tied to the zlib
  and libjpeg that Pillow uses; the decoded pixels do not depend on them.)

Only the standard library and Pillow are needed.
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 1234
NUM_IMAGES = 40
DEFAULT_OUT = Path(__file__).resolve().parent / "sample"

# Named colours, chosen far apart so each name is unambiguous even after JPEG.
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

# Pairs that would be hard to tell apart or read as "the same" colour family.
_LOW_CONTRAST = {
    frozenset(p)
    for p in [
        ("red", "orange"),
        ("red", "pink"),
        ("orange", "yellow"),
        ("orange", "pink"),
        ("yellow", "white"),
        ("blue", "purple"),
        ("green", "gray"),
        ("purple", "gray"),
        ("red", "gray"),
        ("blue", "gray"),
    ]
}

# (width, height): square, landscape and portrait; 161x96 has an odd crop margin.
SIZES: list[tuple[int, int]] = [
    (64, 64),
    (96, 96),
    (128, 128),
    (192, 192),
    (128, 96),
    (96, 128),
    (160, 96),
    (96, 160),
    (192, 128),
    (128, 192),
    (256, 192),
    (192, 256),
    (320, 240),
    (161, 96),
]

# Centre of each named position, as fractions of the central square's side.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}

# Position pairs whose shapes (at most 0.4 of the side) cannot overlap.
PAIRS: list[tuple[str, str]] = [
    ("left", "right"),
    ("top", "bottom"),
    ("top left", "bottom right"),
    ("top right", "bottom left"),
    ("top left", "top right"),
    ("bottom left", "bottom right"),
]

BLOBS = ["circle", "square", "triangle", "diamond"]
# A stripe runs across the whole square, so it only fits where nothing else
# shares its row or column.
STRIPE_POSITIONS = {
    "horizontal stripe": {"top", "center", "bottom"},
    "vertical stripe": {"left", "center", "right"},
}

# Which images are JPEG (to exercise JPEG decoding); the rest are PNG.
JPEG_EVERY = 8
JPEG_OFFSET = 5

_PHRASE = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "in the top left",
    "top right": "in the top right",
    "bottom left": "in the bottom left",
    "bottom right": "in the bottom right",
}
_STRIPE_PHRASE = {
    "center": "across the center",
    "left": "down the left",
    "right": "down the right",
    "top": "across the top",
    "bottom": "across the bottom",
}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of BLOBS or STRIPE_POSITIONS
    colour: str  # key of COLOURS
    position: str  # key of POSITIONS
    size: float  # extent (stripes: thickness) as a fraction of the square side


@dataclass(frozen=True)
class ImageSpec:
    stem: str
    width: int
    height: int
    ext: str  # ".png" or ".jpg"
    background: str
    shapes: tuple[Shape, ...]
    caption: str

    @property
    def filename(self) -> str:
        return self.stem + self.ext


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: Shape, large: bool = False) -> str:
    """'a large orange circle', 'a red horizontal stripe'."""
    words = (["large"] if large else []) + [shape.colour, shape.kind]
    return f"{_article(words[0])} {' '.join(words)}"


def _where(shape: Shape) -> str:
    if shape.kind in STRIPE_POSITIONS:
        return _STRIPE_PHRASE[shape.position]
    return _PHRASE[shape.position]


def _caption(rng: random.Random, bg: str, shapes: tuple[Shape, ...]) -> str:
    bg_words = f"{bg} background"
    if len(shapes) == 1:
        (s,) = shapes
        large = s.size >= 0.55
        templates = [
            f"{_noun(s, large)} {_where(s)} on {_article(bg)} {bg_words}",
            f"{_noun(s, large)} {_where(s)}, {bg_words}",
            f"{bg_words} with {_noun(s, large)} {_where(s)}",
            # Tag style, as many real datasets are captioned.
            f"{s.colour} {s.kind}, {s.position}, {bg_words}",
        ]
    else:
        a, b = shapes
        templates = [
            f"{_noun(a)} {_where(a)} and {_noun(b)} {_where(b)}, "
            f"on {_article(bg)} {bg_words}",
            f"{_noun(a)} {_where(a)}, {_noun(b)} {_where(b)}, {bg_words}",
            f"{bg_words}, {_noun(a)} {_where(a)} and {_noun(b)} {_where(b)}",
            f"{a.colour} {a.kind}, {a.position}, {b.colour} {b.kind}, "
            f"{b.position}, {bg_words}",
        ]
    return rng.choice(templates)


def _contrasts(a: str, b: str) -> bool:
    return a != b and frozenset((a, b)) not in _LOW_CONTRAST


def _pick_colour(rng: random.Random, avoid: list[str]) -> str:
    names = [c for c in COLOURS if all(_contrasts(c, other) for other in avoid)]
    return rng.choice(names)


def build_specs(seed: int = SEED) -> list[ImageSpec]:
    """The full, deterministic description of every image and its caption."""
    rng = random.Random(seed)
    sizes = [SIZES[i % len(SIZES)] for i in range(NUM_IMAGES)]
    rng.shuffle(sizes)
    specs = []
    for i, (w, h) in enumerate(sizes):
        bg = rng.choice(list(COLOURS))
        if i % 2 == 0:  # single shape
            # Centre counted twice so "large ... in the center" shows up too.
            position = rng.choice(list(POSITIONS) + ["center"])
            kinds = BLOBS + [k for k, ok in STRIPE_POSITIONS.items() if position in ok]
            kind = rng.choice(kinds)
            if kind in STRIPE_POSITIONS:
                size = rng.choice([0.25, 0.3])
            elif position == "center":
                size = rng.choice([0.4, 0.6, 0.7])
            else:
                size = rng.choice([0.3, 0.35, 0.4])
            shapes = (Shape(kind, _pick_colour(rng, [bg]), position, size),)
        else:  # two shapes
            pair = rng.choice(PAIRS)
            picked: list[Shape] = []
            for position in pair:
                kinds = list(BLOBS)
                if pair == ("top", "bottom"):
                    kinds.append("horizontal stripe")
                if pair == ("left", "right"):
                    kinds.append("vertical stripe")
                kind = rng.choice(kinds)
                size = 0.25 if kind in STRIPE_POSITIONS else rng.choice([0.3, 0.35, 0.4])
                colour = _pick_colour(rng, [bg] + [s.colour for s in picked])
                picked.append(Shape(kind, colour, position, size))
            shapes = tuple(picked)
        ext = ".jpg" if i % JPEG_EVERY == JPEG_OFFSET else ".png"
        specs.append(
            ImageSpec(f"{i:03d}", w, h, ext, bg, shapes, _caption(rng, bg, shapes))
        )
    return specs


SPECS: list[ImageSpec] = build_specs()


def central_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the largest centered square, as training crops it."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def render(spec: ImageSpec) -> Image.Image:
    img = Image.new("RGB", (spec.width, spec.height), COLOURS[spec.background])
    draw = ImageDraw.Draw(img)
    left, top, side = central_square(spec.width, spec.height)
    for shape in spec.shapes:
        fx, fy = POSITIONS[shape.position]
        cx, cy = left + fx * side, top + fy * side
        fill = COLOURS[shape.colour]
        half = shape.size * side / 2
        # Stripes stop short of the square's edge so an off-by-one crop (some
        # libraries round the crop offset) never cuts them.
        if shape.kind == "horizontal stripe":
            box = [left + 0.04 * side, cy - half, left + 0.96 * side, cy + half]
        elif shape.kind == "vertical stripe":
            box = [cx - half, top + 0.04 * side, cx + half, top + 0.96 * side]
        else:
            box = [cx - half, cy - half, cx + half, cy + half]
        box = [round(v) for v in box]
        x0, y0, x1, y1 = box
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind in ("square", "horizontal stripe", "vertical stripe"):
            draw.rectangle(box, fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif shape.kind == "diamond":
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {shape.kind!r}")
    return img


_GENERATED = re.compile(r"^\d{3}\.(png|jpg|txt)$")


def generate(out_dir: Path) -> list[Path]:
    """Write every image and caption into out_dir; return the image paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {s.filename for s in SPECS} | {s.stem + ".txt" for s in SPECS}
    # Drop files from an older layout (e.g. a stem that switched to .jpg) so the
    # folder never holds an image without a caption or two images per stem.
    for old in out_dir.iterdir():
        if _GENERATED.match(old.name) and old.name not in wanted:
            old.unlink()
    paths = []
    for spec in SPECS:
        img = render(spec)
        path = out_dir / spec.filename
        if spec.ext == ".png":
            img.save(path, format="PNG", optimize=False, compress_level=9)
        else:
            # 4:4:4 keeps the flat colours from bleeding at shape edges.
            img.save(path, format="JPEG", quality=92, subsampling=0,
                     optimize=False, progressive=False)
        # newline="\n" so the caption bytes are the same on Windows.
        (out_dir / f"{spec.stem}.txt").write_text(
            spec.caption + "\n", encoding="utf-8", newline="\n"
        )
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: python datasets/make_sample.py [OUT_DIR]", file=sys.stderr)
        return 2
    out_dir = Path(argv[0]) if argv else DEFAULT_OUT
    paths = generate(out_dir)
    print(f"wrote {len(paths)} images with captions to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
