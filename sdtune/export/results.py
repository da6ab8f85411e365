"""A training run's result on disk: a kohya LoRA, or a full fine-tune as a single
file and/or a diffusers folder (``export.formats``), for SD 1/2 and SDXL."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sdtune import atomic
from sdtune.export.checkpoint import save_checkpoint
from sdtune.export.diffusers_folder import save_diffusers_folder, save_sdxl_diffusers_folder
from sdtune.export.kohya import kohya_state_dict
from sdtune.export.metadata import lora_metadata
from sdtune.export.sgm_checkpoint import save_sdxl_checkpoint
from sdtune.sdxl import SdxlComponents, split_text_encoders
from sdtune.textual_inversion import save_embedding


@dataclass(frozen=True)
class ResultSpec:
    """How a run's result is written; train() fills it from the recipe."""

    method: str  # "lora" | "full" | "textual_inversion"
    formats: tuple[str, ...]  # a full fine-tune's: "single_file", "diffusers"
    dtype: torch.dtype
    prediction_type: str
    zero_terminal_snr: bool
    title: str
    recipe_json: str
    # What the LoRA metadata says about the training (kohya's ss_* keys).
    rank: int = 0
    alpha: float = 0.0
    network_args: dict[str, str] = field(default_factory=dict)
    resolution: int = 0
    learning_rate: float = 0.0
    seed: int = 0


def result_paths(stem: Path, method: str, formats: tuple[str, ...]) -> list[Path]:
    """The files a run writes at ``stem`` (``<dir>/<name>``): the LoRA file, or a full
    fine-tune's single file and/or diffusers folder, in that order."""
    single_file, folder = stem.with_name(f"{stem.name}.safetensors"), stem
    if method != "full":  # a LoRA file, or an embedding file
        return [single_file]
    return [path for kind, path in (("single_file", single_file), ("diffusers", folder)) if kind in formats]


def write_result(stem: Path, spec: ResultSpec, unet, text_encoder, parts, steps: int, num_images: int) -> list[Path]:
    """Write the result beside ``stem``; ``text_encoder`` is the trained one (SDXL's two as
    ``sdxl.text_encoders`` gives them), or None when it was frozen (a full fine-tune then
    writes the base's). Returns the paths written."""
    stem = Path(stem)
    text_encoder, text_encoder_2 = split_text_encoders(text_encoder)
    if spec.method == "textual_inversion":
        return [save_embedding(result_paths(stem, spec.method, ())[0], text_encoder, text_encoder_2, parts, spec, steps, num_images)]
    if spec.method == "lora":
        metadata = lora_metadata(
            base_model_version=parts.base_model_version, prediction_type=spec.prediction_type,
            zero_terminal_snr=spec.zero_terminal_snr, rank=spec.rank, alpha=spec.alpha, resolution=spec.resolution,
            steps=steps, learning_rate=spec.learning_rate, num_images=num_images, seed=spec.seed,
            base_model_name=parts.name, base_model_sha256=parts.sha256, title=spec.title, recipe_json=spec.recipe_json,
            trained_text_encoder=text_encoder is not None, network_args=spec.network_args,
            extra={"sdtune.merged_first": parts.merged_first} if parts.merged_first else None,
        )
        tensors = kohya_state_dict(unet, text_encoder, spec.dtype, base_model_version=parts.base_model_version, text_encoder_2=text_encoder_2)
        return [atomic.save_safetensors(tensors, result_paths(stem, "lora", ())[0], metadata)]
    if isinstance(parts, SdxlComponents):
        return _write_sdxl(stem, spec, unet, text_encoder, text_encoder_2, parts)
    text_encoder = text_encoder if text_encoder is not None else parts.text_encoder
    written = []
    for path in result_paths(stem, "full", spec.formats):
        if path.suffix == ".safetensors":
            written += save_checkpoint(
                path, unet, parts.vae, text_encoder, version=parts.base_model_version,
                prediction_type=spec.prediction_type, zero_terminal_snr=spec.zero_terminal_snr, dtype=spec.dtype,
                extras=parts.ldm_extras or None, title=spec.title,
                extra_metadata={"sdtune.recipe": spec.recipe_json, "sdtune.base_model_sha256": parts.sha256},
            )
        else:
            written.append(save_diffusers_folder(
                path, unet, parts.vae, text_encoder, parts.tokenizer, parts.noise_scheduler.config, spec.dtype
            ))
    return written


def _write_sdxl(stem: Path, spec: ResultSpec, unet, text_encoder, text_encoder_2, parts: SdxlComponents) -> list[Path]:
    """A full SDXL fine-tune: an SGM single file (markers, no sidecars) and/or a StableDiffusionXLPipeline folder."""
    trained = replace(
        parts, unet=unet, text_encoder=text_encoder if text_encoder is not None else parts.text_encoder,
        text_encoder_2=text_encoder_2 if text_encoder_2 is not None else parts.text_encoder_2,
    )
    written = []
    for path in result_paths(stem, "full", spec.formats):
        if path.suffix == ".safetensors":
            written += save_sdxl_checkpoint(
                path, trained.unet, trained.vae, trained.text_encoder, trained.text_encoder_2,
                prediction_type=spec.prediction_type, zero_terminal_snr=spec.zero_terminal_snr, dtype=spec.dtype,
                extras=parts.ldm_extras or None, title=spec.title,
                extra_metadata={"sdtune.recipe": spec.recipe_json, "sdtune.base_model_sha256": parts.sha256},
            )
        else:
            written.append(save_sdxl_diffusers_folder(path, trained, spec.dtype))
    return written
