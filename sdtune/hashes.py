"""Content hashes that identify files and weights, wherever they live on disk.

They key the caches (the same VAE bytes give the same latents), go into output
metadata (what a LoRA was trained against) and make A1111's model and LoRA
hashes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def file_sha256(path: str | Path, skip_safetensors_header: bool = False) -> str:
    """SHA-256 of a file; with ``skip_safetensors_header``, of the tensor bytes only
    (kohya's "addnet" hash, which editing the metadata does not change)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if skip_safetensors_header:
            header_size = int.from_bytes(handle.read(8), "little")
            handle.seek(8 + header_size)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(*folders: Path) -> str:
    """SHA-256 over the weight (and tokenizer) files of component folders, names included."""
    digest = hashlib.sha256()
    for folder in folders:
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            if file.suffix not in WEIGHT_SUFFIXES + (".json", ".txt"):
                continue
            digest.update(f"{folder.name}/{file.name}\0".encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 over names, dtypes, shapes and bytes: one component of a single file, for the caches."""
    digest = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
