"""Find the training samples: images with same-stem caption files in a folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str


def scan_folder(folder: str | Path) -> list[Sample]:
    """Every image under ``folder`` (recursively) with its ``<stem>.txt`` caption, sorted by path.

    Images without a caption are an error that lists them all, before any work:
    a sample silently trained with an empty caption is a quiet way to ruin a run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path {folder} is not a folder of captioned images")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"data.path {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        listed = "\n  ".join(str(p) for p in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ValueError(
            f"{len(missing)} image(s) in {folder} have no caption file (<stem>.txt):\n  {listed}{more}"
        )
    return [Sample(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]
