"""Safetensors metadata (all strings) that the UIs and LoRA browsers read (shared/DESIGN.md, rule 4)."""

from __future__ import annotations

import datetime as dt
import json

import sdtune

# kohya's ss_base_model_version for SDXL 1.0-family models, and sdtune's name for the version.
SDXL = "sdxl_base_v1-0"
# modelspec (Stability AI's model metadata spec), as kohya writes it for SD 1.x/2.x and
# SDXL (a LoRA's architecture adds "/lora"; SDXL says v-prediction in prediction_type only).
MODELSPEC_ARCHITECTURE = {
    ("sd_v1", "epsilon"): "stable-diffusion-v1",
    ("sd_v1", "v_prediction"): "stable-diffusion-v1",
    ("sd_v2", "epsilon"): "stable-diffusion-v2-512",
    ("sd_v2", "v_prediction"): "stable-diffusion-v2-768-v",
    (SDXL, "epsilon"): "stable-diffusion-xl-v1-base",
    (SDXL, "v_prediction"): "stable-diffusion-xl-v1-base",
}
MODELSPEC_IMPLEMENTATION = {
    "sd_v1": "https://github.com/Stability-AI/stablediffusion",
    "sd_v2": "https://github.com/Stability-AI/stablediffusion",
    SDXL: "https://github.com/Stability-AI/generative-models",
}
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}


def lora_metadata(
    *,
    base_model_version: str,
    prediction_type: str,
    zero_terminal_snr: bool,
    rank: int,
    alpha: float,
    resolution: int,
    steps: int,
    learning_rate: float,
    num_images: int,
    seed: int,
    base_model_name: str,
    base_model_sha256: str,
    title: str,
    recipe_json: str,
    trained_text_encoder: bool,
    network_args: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return {
        **_ui_keys(base_model_version, prediction_type, rank, alpha, title, now),
        # LoHa, LoKr and DoRA are LyCORIS' network module, with its `algo` in the network args
        **({"ss_network_module": "lycoris.kohya"} if "algo" in (network_args or {}) else {}),
        # kohya training keys
        "ss_network_args": json.dumps(network_args or {}),
        "ss_network_train_unet_only": str(not trained_text_encoder),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
        "ss_learning_rate": str(learning_rate),
        "ss_num_train_images": str(num_images),
        "ss_seed": str(seed),
        "ss_sd_model_name": base_model_name,
        "ss_new_sd_model_hash": base_model_sha256,
        "ss_zero_terminal_snr": str(zero_terminal_snr),
        "ss_training_finished_at": str(int(now.timestamp())),
        "modelspec.resolution": f"{resolution}x{resolution}",
        # ours
        "sdtune.zero_terminal_snr": str(zero_terminal_snr),
        "sdtune.recipe": recipe_json,
        **(extra or {}),
    }


def converted_lora_metadata(
    *, base_model_version: str, prediction_type: str, rank: int, alpha: float, title: str, source: str
) -> dict[str, str]:
    """Rule-4 metadata for a LoRA converted from another format: what the UIs read, and where it came from.

    Training keys (steps, learning rate, recipe) are left out: the source file does not say.
    """
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return {**_ui_keys(base_model_version, prediction_type, rank, alpha, title, now), "sdtune.converted_from": source}


def _ui_keys(base_model_version: str, prediction_type: str, rank: int, alpha: float, title: str, now: dt.datetime) -> dict[str, str]:
    """What the UIs and LoRA browsers read, for any LoRA we write (A1111 decides SD1 vs SD2 by ss_v2 / ss_base_model_version)."""
    return {
        "ss_v2": str(base_model_version == "sd_v2"),
        "ss_base_model_version": base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[(base_model_version, prediction_type)]}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.prediction_type": MODELSPEC_PREDICTION[prediction_type],
        "modelspec.date": now.isoformat(),
        "sdtune.version": sdtune.__version__,
    }
