"""Find the training samples in the formats people already have on disk.

- a folder of images with same-stem caption files (``.txt``, or ``.caption`` as
  kohya accepts), searched recursively; a subfolder named ``N_name`` repeats its
  images N times (kohya's convention);
- a folder with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a caption
  column: the Hugging Face imagefolder convention);
- a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, or a name that
  ``datasets.load_dataset`` resolves (from its local cache when offline).

Nothing here decodes an image. Problems a source can see by itself (an image
without a caption, a caption without an image, a caption that is not UTF-8) are
returned as :class:`Problem` values next to the samples, so the caller can report
all of them at once instead of stopping at the first. A source that cannot be
read at all (a missing folder, a metadata table that is not UTF-8, not JSON
lines or CSV, or whose rows are not file names and captions) is a
:class:`DataError` naming the file and the line.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdtune.errors import DataError, MissingExtraError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
KOHYA_REPEATS = re.compile(r"^(\d+)_.+")


@dataclass(frozen=True)
class Source:
    """One place samples come from, with what applies to all of them."""

    path: str
    kind: str = "auto"  # auto | folder | metadata | hf
    repeats: int = 1
    prefix: str = ""  # trigger word / caption prefix, always first in the caption
    caption_column: str = "text"  # metadata and hf
    image_column: str = "image"  # hf
    split: str = "train"  # hf
    caption_extensions: tuple[str, ...] = (".txt", ".caption")  # folder
    class_images: bool = False  # DreamBooth class (regularisation) images, weighted by train.prior_loss_weight
    class_prompt: str = ""  # caption of generated class images (sdtune.data.class_images)
    num_class_images: int = 0  # generate until the folder holds this many
    setting: str = "data source"  # the recipe field that named it, for messages (data.path, data.sources[0].path)


@dataclass(frozen=True)
class Sample:
    name: str  # where it came from, for messages: a file path or "<dataset>[row]"
    caption: str
    read: Callable[[], bytes]  # the encoded image file's bytes (png, jpeg, ...)
    repeats: int = 1
    prefix: str = ""
    is_class: bool = False  # from a class_images source


@dataclass(frozen=True)
class Problem:
    name: str  # the file (or dataset row) it concerns
    kind: str  # one of PROBLEM_KINDS
    detail: str = ""


# kind -> how it reads in a report. Order is the order of the report.
PROBLEM_KINDS = {
    "empty": "zero-byte image files",
    "not_image": "files with an image extension that are not images",
    "unreadable": "unreadable or truncated images",
    "caption_encoding": "captions that are not valid UTF-8",
    "too_small": "images smaller than their bucket (they would be upscaled)",
    "extreme_aspect": "images with an extreme aspect ratio (the crop would lose more than half)",
    "no_caption": "images without a caption",
    "no_mask": "images without a loss mask (data.masks: files wants <stem>_mask.png beside each)",
    "bad_mask": "unreadable loss masks, or masks of another shape than their image",
    "orphan_caption": "captions without an image",
}


def resolve_kind(source: Source) -> str:
    if source.kind != "auto":
        return source.kind
    path = Path(source.path)
    if path.is_file() and path.name in METADATA_FILES:
        return "metadata"
    if path.is_dir():
        if any((path / name).is_file() for name in METADATA_FILES):
            return "metadata"
        if any((path / name).is_file() for name in HF_MARKERS):
            return "hf"
        return "folder"
    if "/" in source.path and not path.exists() and source.path.count("/") == 1 and not source.path.startswith((".", "/")):
        return "hf"  # "owner/name": a Hub dataset name, resolved from the local cache
    raise DataError(
        f"{source.setting} {source.path} does not exist; point it at a folder of images with same-stem .txt captions, "
        "a folder with metadata.jsonl/csv, or a datasets folder or name"
    )


def find_samples(source: Source, missing_caption: str) -> tuple[list[Sample], list[Problem]]:
    """The samples of one source, sorted, and the problems seen on the way.

    ``missing_caption``: ``fail`` reports images without a caption as problems,
    ``empty`` trains them with the empty caption, ``filename`` uses the file stem.
    """
    kind = resolve_kind(source)
    if kind == "folder":
        samples, problems = _folder(Path(source.path), source.caption_extensions, missing_caption)
    elif kind == "metadata":
        samples, problems = _metadata(Path(source.path), source.caption_column, missing_caption)
    elif kind == "hf":
        samples, problems = _hf_dataset(source.path, source.split, source.image_column, source.caption_column)
    else:
        raise DataError(f"data source kind {kind!r} is not one of auto, folder, metadata, hf")
    samples = [
        Sample(s.name, s.caption, s.read, s.repeats * source.repeats, source.prefix, source.class_images) for s in samples
    ]
    return samples, problems


def caption_from_filename(path: Path) -> str:
    """`a_red-circle.png` -> "a red circle": what `missing_caption: filename` trains with."""
    return re.sub(r"[_\-]+", " ", path.stem).strip()


def image_files(folder: Path) -> list[Path]:
    """The image files anywhere under ``folder``, sorted; none when it is not a folder."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) if folder.is_dir() else []


def _images_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"data source {folder} is not a folder of captioned images")
    images = image_files(folder)
    if not images:
        raise DataError(f"data source {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _read_caption(path: Path) -> str | Problem:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"caption file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        return Problem(str(path), "caption_encoding", f"byte {exc.start}; save it as UTF-8")


def _missing(image: Path, policy: str, where: str) -> Sample | Problem:
    if policy == "fail":
        return Problem(str(image), "no_caption", where)
    caption = "" if policy == "empty" else caption_from_filename(image)
    return Sample(str(image), caption, image.read_bytes)


def _kohya_repeats(image: Path, root: Path) -> int:
    """`10_sks dog/` means 10 repeats; the nearest such folder above the image counts."""
    for parent in image.relative_to(root).parents:
        match = KOHYA_REPEATS.match(parent.name)
        if match:
            return max(1, int(match.group(1)))
    return 1


def _folder(folder: Path, extensions: tuple[str, ...], missing_caption: str) -> tuple[list[Sample], list[Problem]]:
    images = _images_under(folder)
    samples: list[Sample] = []
    problems: list[Problem] = []
    for image in images:
        caption_file = next((image.with_suffix(ext) for ext in extensions if image.with_suffix(ext).is_file()), None)
        if caption_file is None:
            found = _missing(image, missing_caption, f"no {' or '.join('<stem>' + e for e in extensions)}")
        else:
            found = _read_caption(caption_file)
            if isinstance(found, str):
                found = Sample(str(image), found, image.read_bytes)
        if isinstance(found, Problem):
            problems.append(found)
        else:
            samples.append(Sample(found.name, found.caption, found.read, _kohya_repeats(image, folder)))
    stems = {image.with_suffix("") for image in images}
    for ext in extensions:
        problems += [
            Problem(str(p), "orphan_caption", "no image with this stem")
            for p in sorted(folder.rglob(f"*{ext}"))
            if p.with_suffix("") not in stems
        ]
    return samples, problems


def _metadata(path: Path, caption_column: str, missing_caption: str) -> tuple[list[Sample], list[Problem]]:
    folder = path if path.is_dir() else path.parent
    table = path if path.is_file() else next(folder / name for name in METADATA_FILES if (folder / name).is_file())
    captions: dict[Path, str] = {}
    problems: list[Problem] = []
    for line, row in _metadata_rows(table):
        file_name, caption = _row_fields(row, caption_column, f"{table} line {line}")
        image = _named_file(folder, file_name)
        if image is None:
            problems.append(Problem(str(folder / file_name), "orphan_caption", f"named in {table.name} line {line}"))
            continue
        captions[image] = caption
    samples: list[Sample] = []
    for image in _images_under(folder):
        caption = captions.get(image.resolve())
        if caption is None:
            found = _missing(image, missing_caption, f"not in {table.name}")
            if isinstance(found, Problem):
                problems.append(found)
                continue
            samples.append(found)
        else:
            samples.append(Sample(str(image), caption, image.read_bytes))
    return samples, problems


def _metadata_rows(table: Path) -> list[tuple[int, Any]]:
    """(line number, row) of a metadata.jsonl (any JSON value: checked by the caller) or
    metadata.csv (a dict of the header's columns)."""
    try:
        text = table.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"{table} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{table} is not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
    if table.suffix == ".csv":
        return _csv_rows(table, text)
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # JSON lines end at \n only
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{table} line {number} is not JSON: {exc.msg} (column {exc.colno})") from None
            except (ValueError, RecursionError) as exc:  # numbers of over 4300 digits, nesting too deep
                raise DataError(f"{table} line {number} is not a JSON object we can read: {exc}") from None
    return rows


def _csv_rows(table: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": quoted captions may hold line breaks
    rows = []
    try:
        header = next(reader, None)
        for cells in reader:
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise DataError(
                    f"{table} line {reader.line_num} has {len(cells)} cells but the header has {len(header)} "
                    f"({', '.join(header)}); put quotes around captions that hold commas (\"a red box, studio\")"
                )
            rows.append((reader.line_num, dict(zip(header, cells))))
    except csv.Error as exc:
        raise DataError(f"{table} line {reader.line_num} is not CSV: {exc}") from None
    return rows


def _row_fields(row: Any, caption_column: str, where: str) -> tuple[str, str]:
    """A metadata row's file name and caption, checked: ``where`` names the table and line."""
    if not isinstance(row, dict):
        raise DataError(f"{where} is {_json_kind(row)}, not an object with 'file_name' and {caption_column!r}")
    if "file_name" not in row or caption_column not in row:
        missing = "file_name" if "file_name" not in row else caption_column
        raise DataError(
            f"{where} has no {missing!r} column (columns: {', '.join(map(str, row))}); "
            "set caption_column on the data source to the column that holds the captions"
        )
    file_name, caption = row["file_name"], row[caption_column]
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: 'file_name' is {_json_kind(file_name)}, not the path of an image in the folder")
    if caption is None:
        caption = ""  # as an empty cell of a CSV: the empty caption
    if not isinstance(caption, str):
        raise DataError(f"{where}: {caption_column!r} is {_json_kind(caption)}, not a caption; write captions as strings")
    for column, value in (("file_name", file_name), (caption_column, caption)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # only a JSON \ud800-style escape makes one
            raise DataError(
                f"{where}: {column!r} holds the lone surrogate {value[exc.start]!r} at character {exc.start}, "
                "which is not text; fix the \\u escape"
            ) from None
    return file_name, caption.strip()


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return kinds.get(type(value), type(value).__name__)


def _named_file(folder: Path, name: str) -> Path | None:
    """The file a metadata row names, resolved; None when there is none (a name with a
    NUL byte, or too long for the file system, names none either)."""
    try:
        path = (folder / name).resolve()
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


def _hf_dataset(location: str, split: str, image_column: str, caption_column: str) -> tuple[list[Sample], list[Problem]]:
    try:
        import datasets  # slow to import; only needed for this source
    except ImportError:
        raise MissingExtraError(
            f"data source {location!r} is a Hugging Face dataset, which needs the datasets library: "
            "pip install 'sdtune[hf]' (bash launch.sh test installs it)"
        ) from None

    if Path(location).is_dir():
        try:
            table = datasets.load_from_disk(location)
        except Exception as exc:  # datasets raises many kinds; all mean "not a readable save_to_disk folder"
            raise DataError(
                f"datasets could not read the saved dataset {location} ({type(exc).__name__}: {exc}); "
                "give a folder written by save_to_disk"
            ) from None
    else:
        try:
            table = datasets.load_dataset(location, split=split)
        except Exception as exc:  # datasets raises many kinds; all mean "not available here"
            raise DataError(
                f"datasets could not load {location!r} ({type(exc).__name__}: {exc}); download it once "
                "with network access, or give the folder written by save_to_disk"
            ) from None
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise DataError(f"dataset {location} has splits {list(table)}, not {split!r}; set split on the data source")
        table = table[split]
    for column in (image_column, caption_column):
        if column not in table.column_names:
            raise DataError(
                f"dataset {location} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                "set image_column / caption_column on the data source"
            )
    if isinstance(table.features[image_column], datasets.Image):
        # Keep the encoded bytes: they are what the cache key hashes, and decoding is ours to do.
        table = table.cast_column(image_column, datasets.Image(decode=False))
    captions = table[caption_column]
    samples = [
        Sample(f"{location}[{i}]", str(caption or "").strip(), functools.partial(_row_bytes, table, image_column, i))
        for i, caption in enumerate(captions)
    ]
    return samples, []


def _row_bytes(table, column: str, index: int) -> bytes:
    value = table[index][column]
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        return value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    if isinstance(value, bytes):
        return value
    return Path(value).read_bytes()  # a column of file paths
