"""What a file says about its prediction type and zero terminal SNR (shared/DESIGN.md, rule 6).

Read in one place for every reader (training on a single file, sampling, export,
inspect). A file says it through, first to last: the empty ``v_pred`` / ``ztsnr``
marker tensors ComfyUI writes; safetensors metadata (``modelspec.prediction_type``,
``sdtune.zero_terminal_snr``, kohya's ``ss_v_parameterization`` /
``ss_zero_terminal_snr``); an A1111 ``<file>.yaml`` sidecar with
``parameterization: "v"``; for a diffusers folder, its scheduler config.
``None`` means the file does not say.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdtune.recipe import PREDICTION_ALIASES
from sdtune.weight_files import read_header

_SIDECAR_V = re.compile(r"""parameterization:\s*["']?v["']?\s*$""", re.MULTILINE)

Flags = tuple[str | None, bool | None]  # (prediction type, zero terminal SNR)


def _true(text: str | None) -> bool | None:
    return None if text is None else text.strip().lower() == "true"


def flags_from_metadata(metadata: dict[str, str]) -> Flags:
    """Ours and modelspec first, then kohya's training keys."""
    prediction = PREDICTION_ALIASES.get(metadata.get("modelspec.prediction_type", "").strip().lower())
    if prediction is None and "ss_v_parameterization" in metadata:
        prediction = "v_prediction" if _true(metadata["ss_v_parameterization"]) else "epsilon"
    ztsnr = _true(metadata.get("sdtune.zero_terminal_snr", metadata.get("ss_zero_terminal_snr")))
    return prediction, ztsnr


def flags_from_file(path: str | Path, keys: set[str], metadata: dict[str, str]) -> Flags:
    """A single file's flags from its tensor names and metadata, then its A1111 sidecar."""
    prediction, ztsnr = flags_from_metadata(metadata)
    if "v_pred" in keys:
        prediction = "v_prediction"
    if "ztsnr" in keys:
        ztsnr = True
    sidecar = Path(path).with_suffix(".yaml")
    if prediction is None and sidecar.is_file() and _SIDECAR_V.search(sidecar.read_text(encoding="utf-8", errors="replace")):
        prediction = "v_prediction"
    return prediction, ztsnr


def stated_flags(path: str | Path) -> Flags:
    """What a model (diffusers folder, or single file: safetensors, or a pickle's sidecar) says."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "scheduler" / "scheduler_config.json"
        if not config_file.is_file():
            return None, None
        config = json.loads(config_file.read_text(encoding="utf-8"))
        return config.get("prediction_type"), config.get("rescale_betas_zero_snr")
    if path.suffix != ".safetensors":  # a pickle says nothing without unpickling; its sidecar may
        return flags_from_file(path, set(), {})
    return flags_from_file(path, *read_header(path))


def check_training_flags(path: Path, marked: Flags, prediction_type: str, zero_terminal_snr: bool) -> None:
    """A file that states its prediction type or zero terminal SNR must agree with the recipe:
    training a v model on epsilon targets (or the reverse) silently ruins it."""
    marked_type, marked_ztsnr = marked
    if marked_type not in (None, prediction_type):
        raise ValueError(
            f"{path} is marked {marked_type} (v_pred tensor or modelspec.prediction_type), "
            f"but model.prediction_type is {prediction_type}; set model.prediction_type: {marked_type}"
        )
    if marked_ztsnr is not None and marked_ztsnr != zero_terminal_snr:
        raise ValueError(
            f"{path} is marked zero_terminal_snr={marked_ztsnr}, but model.zero_terminal_snr is "
            f"{zero_terminal_snr}; set model.zero_terminal_snr: {str(marked_ztsnr).lower()}"
        )
