"""Reading weight files, with one loading policy for all of them.

safetensors by default. A pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``: a
single-file model, a LoRA, or the weights inside a diffusers folder) can run code
when it is loaded, so it is read only when the user allows it
(``model.allow_pickle: true``, ``--allow-pickle``), and then only as tensors:
``torch.load(weights_only=True)``, and diffusers' and transformers' own loaders,
which use ``weights_only=True`` for ``.bin`` files too. A file that is not what
its name says is a ``ModelFileError`` naming it, never a library traceback.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdtune.errors import ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PICKLE_ADVICE = (
    "a pickle can run code when it is loaded; convert it to .safetensors, or allow it with model.allow_pickle: true "
    "(--allow-pickle on the command line), and sdtune reads only its tensors (torch.load weights_only=True)"
)


def is_pickle(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def read_weights(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a ``.safetensors`` file, or (allowed) a pickle's tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file")
    if is_pickle(path):
        if not allow_pickle:
            raise ModelFileError(f"{path} is a pickle: {PICKLE_ADVICE}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelFileError(
                f"{path} holds objects other than tensors, which sdtune does not load even with model.allow_pickle "
                f"({str(exc).splitlines()[0][:200]}); convert it to .safetensors with the tool that made it"
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise ModelFileError(f"{path} is not a readable PyTorch file ({str(exc).splitlines()[0][:200]})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise ModelFileError(f"{path} holds a {type(loaded).__name__}, not a mapping of tensor names to tensors")
        return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, {}
    with _opened(path) as handle:
        try:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except SafetensorError as exc:
            raise ModelFileError(f"{path} is damaged: {exc} (truncated or overwritten?); download or export it again") from None


def read_header(path: str | Path) -> tuple[set[str], dict[str, str]]:
    """A ``.safetensors`` file's tensor names and metadata, without reading the tensors."""
    with _opened(Path(path)) as handle:
        return set(handle.keys()), dict(handle.metadata() or {})


class _opened:
    """``safe_open`` whose failures name the file and say what it is not."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        if self.path.suffix.lower() != ".safetensors":
            raise ModelFileError(f"{self.path}: expected a .safetensors file (or a diffusers folder)")
        try:
            self.handle = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(
                f"{self.path} is not a readable safetensors file ({exc}); it may be truncated, another format "
                "renamed to .safetensors, or not a model at all"
            ) from None
        return self.handle.__enter__()

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def folder_pickles(folder: str | Path) -> list[Path]:
    """Pickled weight files of a diffusers model folder whose component has no safetensors copy."""
    found = []
    for component in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        files = [f for f in component.iterdir() if f.is_file()]
        if not any(f.suffix == ".safetensors" for f in files):
            found += sorted(f for f in files if is_pickle(f))
    return found


def check_folder(folder: str | Path, allow_pickle: bool) -> None:
    """A diffusers folder whose weights are pickles needs the same permission as a .ckpt."""
    pickles = folder_pickles(folder)
    if pickles and not allow_pickle:
        raise ModelFileError(f"{folder} stores weights as pickles ({', '.join(str(p.relative_to(folder)) for p in pickles[:3])}): {PICKLE_ADVICE}")


@contextlib.contextmanager
def loading_folder(folder: Path):
    """A diffusers folder that is incomplete or damaged fails with its path and the
    library's reason in one line, not a traceback from inside the library."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, (ModelFileError, torch.OutOfMemoryError)):
            raise
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"the diffusers model folder {folder} could not be loaded ({type(exc).__name__}: {reason}); "
            "is it complete (model_index.json and the unet, vae, text_encoder, tokenizer and scheduler folders)?"
        ) from None
