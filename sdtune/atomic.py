"""Atomic, durable writes: a crash, a kill or a power cut leaves the old file or the
whole new one, never half of one.

Each write goes to ``.<name>.<host>.<pid>.tmp`` beside the target, is flushed to disk
(fsync), gets the normal mode for a new file (``0666`` less the umask, as
``open()`` would give: safetensors itself creates ``0600`` files, which a UI
running as another user cannot read), and is renamed over the target; then
the folder is flushed so the rename itself survives a power cut.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()
DIR_MODE = 0o777 & ~_read_umask()


# Temp names say which process on which machine writes them, so a later start can
# remove those of processes that died (a kill, a power cut) and leave a live one's.
HOST = socket.gethostname().replace(".", "-") or "host"
TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)(?:\.old)?\.tmp$")
STALE_AFTER_S = 24 * 3600  # another machine's temp (shared storage) is stale after a day


def tmp_beside(path: Path, suffix: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove, in ``folder`` (and below it, with ``recursive``), the temp files and folders
    of writes whose process is gone (killed mid-write); returns what was removed. A temp
    of a live process, or of another machine younger than a day, is left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            match = TMP_NAME.match(name)
            if match is None:
                continue
            path = Path(root) / name
            mine = match["host"] == HOST
            try:
                stale = (mine and not _alive(int(match["pid"]))) or time.time() - path.lstat().st_mtime > STALE_AFTER_S
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
                removed.append(path)
        dirs[:] = [d for d in dirs if not TMP_NAME.match(d)] if recursive else []
    return removed


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot, so the caller falls back to two renames."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), str(b))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def publish_folder(tmp: Path, final: Path) -> Path:
    """Make a folder written at ``tmp`` (best named by ``tmp_beside(final)``) appear as
    ``final``: normal modes, every file flushed, then renamed. An existing ``final``
    is swapped with the new one in one step where the filesystem can (Linux), so a
    reader or a kill never finds it missing; elsewhere it is moved aside first and
    removed once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    for root, _, files in os.walk(tmp):
        os.chmod(root, DIR_MODE)
        for name in files:
            os.chmod(Path(root) / name, FILE_MODE)
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    if final.exists() and _exchange(tmp, final):  # one step: ``final`` is never missing
        fsync_path(final.parent)
        shutil.rmtree(tmp)  # the old folder, now at the temp name (a later start removes it if killed here)
        return final
    old = None
    if final.exists():  # where the filesystem cannot swap (e.g. NFS): two renames
        old = tmp_beside(final, "old.tmp")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)
    return final
