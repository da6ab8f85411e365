"""Labelled image grids: X/Y comparison plots, as A1111's X/Y plot draws them.

Column labels go in a strip above the cells, row labels in a strip to their
left; every cell is one generated image at its own size, so a grid of C columns
and R rows of WxH images is ``left + C*W`` wide and ``top + R*H`` high.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# What an axis can vary, and how its values are read from the command line.
AXES = {"steps": int, "cfg": float, "sampler": str, "seed": int, "lora": float, "prompt": str}
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PADDING = 4


@dataclass(frozen=True)
class Axis:
    name: str  # a key of AXES
    values: tuple


def parse_axis(spec: str) -> Axis:
    """``steps:10,20,40`` -> ``Axis("steps", (10, 20, 40))``.

    Values are separated by commas, or by ``|`` when any contains a comma
    (prompts: ``prompt:a cat, red|a dog, blue``).
    """
    name, sep, values = spec.partition(":")
    name = name.strip().replace(" ", "_").lower()
    if name in ("lora_weight", "weight"):
        name = "lora"
    if not sep or name not in AXES:
        raise ValueError(f"grid axis {spec!r}: write NAME:V1,V2,... with NAME one of {', '.join(AXES)}")
    parts = [v.strip() for v in values.split("|" if "|" in values else ",")]
    if not all(parts):
        raise ValueError(f"grid axis {spec!r} has an empty value")
    try:
        return Axis(name, tuple(AXES[name](v) for v in parts))
    except ValueError:
        raise ValueError(f"grid axis {spec!r}: {name} values must be {AXES[name].__name__}s") from None


def axis_label(axis: Axis, value) -> str:
    """``cfg: 7.5``, ``steps: 20``; a prompt is its own label."""
    if axis.name == "prompt":
        return str(value)
    return f"{axis.name}: {value:g}" if isinstance(value, float) else f"{axis.name}: {value}"


def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word longer than a line keeps a line of its own."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def draw_grid(cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str]) -> Image.Image:
    """One image of ``cells[row][column]`` with labels above the columns and left of the rows.

    An empty ``row_labels`` entry list (one row, no Y axis) leaves out the left strip.
    """
    rows, cols = len(cells), len(cells[0])
    if any(len(row) != cols for row in cells) or len(column_labels) != cols or len(row_labels) not in (0, rows):
        raise ValueError(f"grid of {rows}x{cols} cells needs {cols} column labels and {rows} row labels (or none)")
    width, height = cells[0][0].size
    font = ImageFont.load_default()
    line_height = int(sum(font.getmetrics())) + 2
    column_lines = [wrap(label, font, width - 2 * PADDING) for label in column_labels]
    top = max(len(lines) for lines in column_lines) * line_height + 2 * PADDING
    left_width = 0
    row_lines = []
    if row_labels:
        # Row labels get at most twice a cell's width, then wrap.
        left_width = min(2 * width, max(int(font.getlength(label)) for label in row_labels) + 2 * PADDING)
        row_lines = [wrap(label, font, left_width - 2 * PADDING) for label in row_labels]
    grid = Image.new("RGB", (left_width + cols * width, top + rows * height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(column_lines):
        for i, line in enumerate(lines):
            x = left_width + c * width + (width - font.getlength(line)) / 2
            draw.text((x, PADDING + i * line_height), line, fill=INK, font=font)
    for r, lines in enumerate(row_lines):
        y0 = top + r * height + (height - len(lines) * line_height) / 2
        for i, line in enumerate(lines):
            draw.text((PADDING, y0 + i * line_height), line, fill=INK, font=font)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell.size != (width, height):
                raise ValueError(f"grid cells must share one size; got {cell.size} and {(width, height)}")
            grid.paste(cell.convert("RGB"), (left_width + c * width, top + r * height))
    return grid
