"""Generation parameters in AUTOMATIC1111's "infotext" format, stored in a PNG ``parameters`` chunk.

A1111 writes (``modules/processing.py`` ``create_infotext``) and its PNG Info tab
reads back (``modules/infotext_utils.py`` ``parse_generation_parameters``) this text:

    a red square <lora:my_lora:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: base

The prompt may span lines; the negative prompt starts at the line beginning with
``Negative prompt:``; the last line holds ``Key: value`` pairs joined by ``, ``. A
value containing ``,``, ``:`` or a newline is written as a JSON string (A1111's
``quote``), which is how ``Lora hashes: "name: 0123456789ab"`` keeps its inner
colon and commas.

Hashes follow A1111: a checkpoint's "Model hash" is the first 10 hex digits of
the file's SHA-256; a LoRA's hash is the first 12 hex digits of kohya's
"addnet" hash, the SHA-256 of a .safetensors file's bytes after the header (so
editing metadata does not change it).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdtune import atomic
from sdtune.hashes import file_sha256

PARAMETERS_KEY = "parameters"  # the PNG tEXt keyword A1111 reads and writes
NEGATIVE_PREFIX = "Negative prompt:"
# One `Key: value` pair of the last line: a key of word characters, spaces, `-` or `/`,
# then either a JSON string (which may hold commas) or anything up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
# A1111 takes the last line as parameters only if it has at least this many pairs.
_MIN_PAIRS = 3


def quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """The infotext of one image; ``None`` values are left out, as A1111 does."""
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """``(prompt, negative prompt, {key: value})`` from an infotext; values stay strings."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < _MIN_PAIRS:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if not negative_lines and line.startswith(NEGATIVE_PREFIX):
            negative_lines.append(line.removeprefix(NEGATIVE_PREFIX).strip())
        elif negative_lines:  # everything after the negative prompt's first line belongs to it
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    params = {}
    for key, value in _PAIR.findall(last):
        params[key.strip()] = json.loads(value) if value.startswith('"') and value.endswith('"') else value.strip()
    return "\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), params


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` with its infotext, atomically (a half-written PNG never appears under ``path``)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic.write_bytes(path, buffer.getvalue())


def read_png_parameters(path: str | Path) -> str:
    with Image.open(path) as image:
        image.load()
        if PARAMETERS_KEY not in image.info:
            raise ValueError(f"{path} has no '{PARAMETERS_KEY}' text chunk; it was not written by sdtune or A1111")
        return image.info[PARAMETERS_KEY]


def lora_short_hash(path: str | Path, metadata: dict[str, str]) -> str:
    """The hash A1111 writes in ``Lora hashes``: kohya's ``sshs_model_hash`` when the
    file carries it, otherwise the addnet hash of the file; 12 hex digits."""
    full = metadata.get("sshs_model_hash") or file_sha256(path, skip_safetensors_header=True)
    return full[:12]


def lora_alias(name: str) -> str:
    """A LoRA's name as A1111 writes it in ``Lora hashes``: without ``:`` and ``,``."""
    return name.replace(":", "").replace(",", "")
