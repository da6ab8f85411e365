"""Checks on the bundled sample dataset in datasets/sample.

The generator script is loaded from its path: ``datasets`` is not a package
(and the name would clash with the Hugging Face ``datasets`` library).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "datasets" / "make_sample.py"
SAMPLE = REPO / "datasets" / "sample"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CROP = 64  # the smallest training resolution the sample is meant for
JPEG_TOL = 40  # per-channel slack for JPEG artefacts


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("_sdtune_make_sample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _images() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SAMPLE.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


def _captions() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SAMPLE.glob("*.txt"))}


def _center_crop(img: Image.Image, size: int = CROP) -> Image.Image:
    """Resize-shorter-side-then-center-crop, as training does."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = img.convert("RGB").crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BILINEAR)


def _close(a, b, tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_every_image_has_a_caption_and_vice_versa():
    images, captions = _images(), _captions()
    assert len(images) >= 32
    assert set(images) == set(captions)
    # Nothing else in the folder, and no stem with two images.
    assert len(list(SAMPLE.iterdir())) == len(images) + len(captions)
    for stem, path in captions.items():
        assert path.read_text(encoding="utf-8").strip(), f"{stem}: empty caption"


def test_caption_files_are_one_short_line():
    for stem, path in _captions().items():
        text = path.read_bytes().decode("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1, stem
        line = text[:-1]
        assert line == line.strip(), f"{stem}: stray whitespace"
        assert "\r" not in line
        assert len(line.split()) < 25, f"{stem}: caption too long"


def test_sizes_and_formats_vary():
    sizes = set()
    formats = set()
    for path in _images().values():
        with Image.open(path) as img:
            sizes.add(img.size)
            formats.add(img.format)
    ratios = {Fraction(w, h) for w, h in sizes}
    assert len(ratios) >= 3
    assert any(r > 1 for r in ratios), "no landscape image"
    assert any(r < 1 for r in ratios), "no portrait image"
    assert Fraction(1) in ratios, "no square image"
    assert formats == {"PNG", "JPEG"}


def test_regenerating_gives_the_committed_files(gen, tmp_path):
    # Captions byte for byte, PNG pixels exactly; encoded bytes (and JPEG
    # pixels, within a few levels) may differ between Pillow/libjpeg builds.
    written = gen.generate(tmp_path)
    assert len(written) == len(_images())
    committed = {p.name for p in SAMPLE.iterdir()}
    fresh = {p.name for p in tmp_path.iterdir()}
    assert fresh == committed
    different = []
    for name in sorted(committed):
        if name.endswith(".txt"):
            same = (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes()
        else:
            with Image.open(tmp_path / name) as a, Image.open(SAMPLE / name) as b:
                pa, pb = a.convert("RGB").tobytes(), b.convert("RGB").tobytes()
            tolerance = 0 if name.endswith(".png") else 12
            same = len(pa) == len(pb) and max(abs(x - y) for x, y in zip(pa, pb)) <= tolerance
        if not same:
            different.append(name)
    assert not different, f"regenerated files differ: {different}"


def test_specs_match_committed_files(gen):
    assert [s.filename for s in gen.SPECS] == [p.name for p in _images().values()]
    for s in gen.SPECS:
        caption = (SAMPLE / f"{s.stem}.txt").read_text(encoding="utf-8").strip()
        assert caption == s.caption
        with Image.open(SAMPLE / s.filename) as img:
            assert img.size == (s.width, s.height)


SHAPE_KINDS = ["horizontal stripe", "vertical stripe", "circle", "square",
               "triangle", "diamond"]
POSITION_WORDS = ["top", "bottom", "left", "right", "center"]


def _parse_caption(caption: str, colours) -> tuple[str, list[tuple[str, str, str]]]:
    """Read (background, [(colour, kind, position), ...]) from a caption alone.

    A shape's position is the position words between its "<colour> <kind>"
    and the next shape or the background, which holds for both the prose and
    the tag-style captions.
    """
    colour_re = "|".join(colours)
    bg = re.findall(rf"\b({colour_re}) background\b", caption)
    assert len(bg) == 1, caption
    shape_re = re.compile(rf"\b({colour_re}) ({'|'.join(SHAPE_KINDS)})\b")
    mentions = list(shape_re.finditer(caption))
    bg_start = caption.index(f"{bg[0]} background")
    shapes = []
    for i, m in enumerate(mentions):
        stops = [x.start() for x in mentions[i + 1:]] + [len(caption)]
        if bg_start > m.end():
            stops.append(bg_start)
        tail = caption[m.end():min(stops)]
        words = [w for w in re.findall(r"[a-z]+", tail) if w in POSITION_WORDS]
        shapes.append((m.group(1), m.group(2), " ".join(words)))
    return bg[0], shapes


def test_captions_describe_the_spec_and_nothing_else(gen):
    for s in gen.SPECS:
        bg, shapes = _parse_caption(s.caption, gen.COLOURS)
        assert bg == s.background, s.caption
        assert shapes == [(sh.colour, sh.kind, sh.position) for sh in s.shapes], s.caption
        # No colour or shape named that was not drawn.
        words = set(re.findall(r"[a-z]+", s.caption))
        assert words & set(gen.COLOURS) == {bg} | {c for c, _, _ in shapes}, s.caption
        shape_words = {"circle", "square", "triangle", "diamond", "stripe"}
        assert words & shape_words == {k.split()[-1] for _, k, _ in shapes}, s.caption


def _probe_point(position: str) -> tuple[float, float]:
    """Where a shape described by `position` must be, in the cropped square."""
    x = 0.25 if "left" in position else 0.75 if "right" in position else 0.5
    y = 0.25 if "top" in position else 0.75 if "bottom" in position else 0.5
    return x, y


def test_pixels_agree_with_captions_after_center_crop(gen):
    # Uses only the caption text and the colour names' RGB values, not the
    # generator's geometry, so a caption that lies about the picture fails.
    for path in _images().values():
        caption = (SAMPLE / f"{path.stem}.txt").read_text(encoding="utf-8").strip()
        bg_name, shapes = _parse_caption(caption, gen.COLOURS)
        assert shapes, caption
        tol = JPEG_TOL if path.suffix == ".jpg" else 0
        with Image.open(path) as img:
            crop = _center_crop(img)
        raw = crop.tobytes()
        pixels = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
        bg = gen.COLOURS[bg_name]
        # Corners of the crop are background: shapes keep clear of the edge.
        for x, y in [(0, 0), (CROP - 1, 0), (0, CROP - 1), (CROP - 1, CROP - 1)]:
            assert _close(crop.getpixel((x, y)), bg, tol), f"{path.name}: corner"
        for colour, kind, position in shapes:
            rgb = gen.COLOURS[colour]
            fx, fy = _probe_point(position)
            at = crop.getpixel((int(fx * CROP), int(fy * CROP)))
            assert _close(at, rgb, tol), f"{path.name}: no {colour} {kind} at {position}"
            # Still clearly visible at 64x64: at least half of a 16x16 block.
            count = sum(_close(p, rgb, tol) for p in pixels)
            assert count >= (CROP // 4) ** 2 // 2, f"{path.name}: {colour} {kind} too small"


def test_nothing_is_drawn_outside_the_central_square(gen):
    # Exact check on PNGs only: JPEG ringing leaks a little past shape edges.
    for s in gen.SPECS:
        if s.ext != ".png":
            continue
        with Image.open(SAMPLE / s.filename) as img:
            img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        bg = gen.COLOURS[s.background]
        # Also the square's outermost pixel ring, so a crop offset rounded the
        # other way (some libraries round, not floor) cuts nothing either.
        inner = (left + 1, top + 1, left + side - 1, top + side - 1)
        for y in range(h):
            for x in range(w):
                if inner[0] <= x < inner[2] and inner[1] <= y < inner[3]:
                    continue
                assert img.getpixel((x, y)) == bg, f"{s.stem}: shape at ({x}, {y})"
