"""Content hashes that identify files and weights, wherever they live on disk.

They key the caches (the same VAE bytes give the same latents), go into output
metadata (what a LoRA was trained against) and make A1111's model and LoRA
hashes.

Hashing a base model's weights takes seconds (SD 1.5's 4 GB: 2 to 10 s), so the
digest of large files is remembered in sdtune's cache folder, keyed by the files'
place and identity (device, inode) and their size, modification and change times:
any write to a file changes its change time (ctime), which no user can set back, so
a changed file is always hashed again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from sdtune import atomic

WEIGHT_SUFFIXES = (".safetensors", ".bin")
REMEMBER_FROM_BYTES = 64 << 20  # smaller files are hashed again each time (well under 0.1 s)


def sdtune_cache_dir() -> Path:
    """sdtune's cache folder: $SDTUNE_CACHE, else $XDG_CACHE_HOME/sdtune (~/.cache/sdtune)."""
    if os.environ.get("SDTUNE_CACHE"):
        return Path(os.environ["SDTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdtune"


def file_sha256(path: str | Path, skip_safetensors_header: bool = False) -> str:
    """SHA-256 of a file; with ``skip_safetensors_header``, of the tensor bytes only
    (kohya's "addnet" hash, which editing the metadata does not change)."""

    def compute() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            if skip_safetensors_header:
                header_size = int.from_bytes(handle.read(8), "little")
                handle.seek(8 + header_size)
            _read_into(digest, handle)
        return digest.hexdigest()

    return _remembered(f"file skip_header={skip_safetensors_header}", [Path(path)], compute)


def weights_sha256(*folders: Path) -> str:
    """SHA-256 over the weight (and tokenizer) files of component folders, names included."""
    files = [(folder, file) for folder in folders for file in sorted(p for p in folder.iterdir() if p.is_file())
             if file.suffix in WEIGHT_SUFFIXES + (".json", ".txt")]

    def compute() -> str:
        digest = hashlib.sha256()
        for folder, file in files:
            digest.update(f"{folder.name}/{file.name}\0".encode())
            with open(file, "rb") as handle:
                _read_into(digest, handle)
        return digest.hexdigest()

    return _remembered("folders " + "\0".join(folder.name for folder in folders), [file for _, file in files], compute)


def _read_into(digest, handle) -> None:
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)


def _remembered(kind: str, files: list[Path], compute) -> str:
    """``compute()``, or the digest it gave for these very files before (when they are large)."""
    stats = [file.stat() for file in files]
    if sum(st.st_size for st in stats) < REMEMBER_FROM_BYTES:
        return compute()
    identity = "\n".join(f"{file.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
                         for file, st in zip(files, stats))
    key = hashlib.sha256(f"{kind}\n{identity}".encode()).hexdigest()
    memo = sdtune_cache_dir() / "hashes" / key[:2] / f"{key}.txt"
    try:
        known = memo.read_text(encoding="ascii").strip()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    except (OSError, UnicodeDecodeError):
        pass
    value = compute()
    try:
        atomic.write_text(memo, value)
    except OSError:
        pass  # a read-only cache costs the hashing next time, nothing else
    return value


def tensors_sha256(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 over names, dtypes, shapes and bytes: one component of a single file, for the caches."""
    digest = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
