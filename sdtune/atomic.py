"""Atomic, durable writes: a crash, a kill or a power cut leaves the old file or the
whole new one, never half of one.

Each write goes to ``.<name>.<pid>.tmp`` beside the target, is flushed to disk
(fsync), gets the normal mode for a new file (``0666`` less the umask, as
``open()`` would give: safetensors itself creates ``0600`` files, which a UI
running as another user cannot read), and is renamed over the target; then
the folder is flushed so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()
DIR_MODE = 0o777 & ~_read_umask()


def tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    os.chmod(tmp, FILE_MODE)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_beside(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_beside(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish_folder(tmp: Path, final: Path) -> Path:
    """Make a folder written at ``tmp`` (best named by ``tmp_beside(final)``) appear as
    ``final``: normal modes, every file flushed, then renamed. An existing ``final``
    is moved aside first and removed only once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    for root, _, files in os.walk(tmp):
        os.chmod(root, DIR_MODE)
        for name in files:
            os.chmod(Path(root) / name, FILE_MODE)
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)
    return final
