"""``sdtune export``: LoRA and checkpoint conversions, each returning the files it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdtune import atomic
from sdtune.export.checkpoint import read_tensors, save_checkpoint
from sdtune.export.diffusers_folder import save_diffusers_folder, save_sdxl_diffusers_folder
from sdtune.export.kohya import OPENCLIP_PREFIXES, merge_lora, partial_sd2_attention, peft_alphas, peft_to_kohya, read_lora_as_kohya
from sdtune.export.metadata import SDXL, converted_lora_metadata
from sdtune.export.markers import flags_from_metadata, stated_flags
from sdtune.export.sgm_checkpoint import save_sdxl_checkpoint
from sdtune.models import DTYPES, Components, load_components
from sdtune.outputs import check_replaceable
from sdtune.sdxl import SdxlComponents, is_sdxl, load_sdxl_components



def load_base(
    path: str | Path, prediction: str | None, zero_terminal_snr: bool | None, allow_pickle: bool = False
) -> tuple[Components | SdxlComponents, str, bool]:
    """A base model (SD 1.x/2.x or SDXL) with its prediction type: the one asked for, else the one it states, else epsilon."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a diffusers folder or a single-file .safetensors")
    stated, stated_ztsnr = stated_flags(path)
    prediction = prediction or stated or "epsilon"
    ztsnr = bool(stated_ztsnr) if zero_terminal_snr is None else zero_terminal_snr
    load = load_sdxl_components if is_sdxl(path, allow_pickle) else load_components
    return load(path, prediction, ztsnr, allow_pickle=allow_pickle), prediction, ztsnr


def _save_single_file(out, parts, prediction: str, ztsnr: bool, dtype: str, extra_metadata: dict | None = None) -> list[Path]:
    common = {"prediction_type": prediction, "zero_terminal_snr": ztsnr, "dtype": DTYPES[dtype], "extras": parts.ldm_extras or None}
    if parts.base_model_version == SDXL:
        return save_sdxl_checkpoint(out, parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2, extra_metadata=extra_metadata, **common)
    return save_checkpoint(out, parts.unet, parts.vae, parts.text_encoder, version=parts.base_model_version, extra_metadata=extra_metadata, **common)


def export_lora(
    src: str | Path, out: str | Path, *, alpha: float | None = None, base_version: str | None = None,
    prediction: str = "epsilon", dtype: str = "fp16", overwrite: bool = False, allow_pickle: bool = False,
) -> list[Path]:  # fmt: skip
    """A PEFT/diffusers LoRA (a .safetensors file, or a peft folder with adapter_config.json) -> kohya file."""
    src, out = Path(src), Path(out)
    check_replaceable(out, overwrite)
    alphas: dict[str, float] = {}
    if src.is_dir():
        config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"{src}: per-layer rank_pattern/alpha_pattern are not supported; export without them")
        alphas = dict.fromkeys(("unet", "text_encoder", "text_encoder_2"), config["lora_alpha"])
        src = src / "adapter_model.safetensors" if (src / "adapter_model.safetensors").is_file() or not allow_pickle else src / "adapter_model.bin"
    tensors, metadata = read_tensors(src, allow_pickle)
    alphas |= peft_alphas(metadata, src)
    if alpha is not None:
        alphas = dict.fromkeys(("unet", "text_encoder", "text_encoder_2"), alpha)
    if base_version is None:
        second = any(key.startswith("text_encoder_2.") for key in tensors)  # only SDXL has one
        base_version = SDXL if second else _version_from_lora(peft_to_kohya(tensors, alphas))
    kohya = peft_to_kohya(tensors, alphas, DTYPES[dtype], sdxl=base_version == SDXL)
    if base_version in OPENCLIP_PREFIXES and partial_sd2_attention({k.split(".", 1)[0] for k in kohya}, OPENCLIP_PREFIXES[base_version]):
        raise ValueError("this LoRA adapts only part of q/k/v/out_proj in some OpenCLIP text-encoder layers; A1111 would apply none of them")
    ranks = {int(t.shape[0]) for k, t in kohya.items() if k.endswith("lora_down.weight")}
    alpha_values = {float(t) for k, t in kohya.items() if k.endswith(".alpha")}
    metadata = converted_lora_metadata(
        base_model_version=base_version, prediction_type=prediction, rank=max(ranks), alpha=max(alpha_values),
        title=out.stem, source=src.name,
    )  # fmt: skip
    return [atomic.save_safetensors(kohya, out, metadata)]


def _version_from_lora(kohya: dict[str, torch.Tensor]) -> str:
    # Cross-attention k/v read the text encoders' output: 768 wide for SD 1, 1024 for SD 2,
    # 2048 for SDXL (CLIP-L and bigG side by side), whose second encoder is its own component.
    widths = {768: "sd_v1", 1024: "sd_v2", 2048: SDXL}
    for key, value in kohya.items():
        if "attn2_to_k" in key and key.endswith("lora_down.weight") and value.shape[1] in widths:
            return widths[value.shape[1]]
    if any(key.startswith("lora_te2_") for key in kohya):
        return SDXL
    raise ValueError(f"cannot tell the base model from this LoRA's shapes; pass --base-version sd_v1, sd_v2 or {SDXL}")


def export_merge(
    lora: str | Path, base: str | Path, out: str | Path, *, multiplier: float = 1.0, prediction: str | None = None,
    zero_terminal_snr: bool | None = None, dtype: str = "fp16", overwrite: bool = False, allow_pickle: bool = False,
) -> list[Path]:  # fmt: skip
    """A kohya LoRA merged into a base model by the UIs' rule, written as a single-file checkpoint."""
    out = Path(out)
    check_replaceable(out, overwrite)
    sdxl = Path(base).exists() and is_sdxl(base, allow_pickle)
    tensors, lora_metadata = read_lora_as_kohya(lora, allow_pickle, sdxl=sdxl)
    lora_prediction, lora_ztsnr = flags_from_metadata(lora_metadata)
    prediction = prediction or lora_prediction
    zero_terminal_snr = lora_ztsnr if zero_terminal_snr is None else zero_terminal_snr
    parts, prediction, ztsnr = load_base(base, prediction, zero_terminal_snr, allow_pickle)
    if lora_metadata.get("ss_base_model_version", parts.base_model_version) != parts.base_model_version:
        raise ValueError(f"{lora} was trained on {lora_metadata['ss_base_model_version']}, the base is {parts.base_model_version}")
    merge_lora(tensors, parts.unet, parts.text_encoder, multiplier, text_encoder_2=getattr(parts, "text_encoder_2", None))
    merged = {"sdtune.merged_lora": Path(lora).name, "sdtune.merge_multiplier": str(multiplier)}
    return _save_single_file(out, parts, prediction, ztsnr, dtype, merged)


def export_checkpoint(
    src: str | Path, out: str | Path, *, prediction: str | None = None, zero_terminal_snr: bool | None = None,
    dtype: str = "fp16", overwrite: bool = False, allow_pickle: bool = False,
) -> list[Path]:  # fmt: skip
    """A diffusers folder (or another single file, e.g. to add markers) -> single-file checkpoint."""
    check_replaceable(Path(out), overwrite)
    parts, prediction, ztsnr = load_base(src, prediction, zero_terminal_snr, allow_pickle)
    return _save_single_file(out, parts, prediction, ztsnr, dtype)


def export_diffusers(
    src: str | Path, out: str | Path, *, prediction: str | None = None, zero_terminal_snr: bool | None = None,
    dtype: str = "fp16", overwrite: bool = False, allow_pickle: bool = False,
) -> list[Path]:  # fmt: skip
    """A single-file checkpoint -> diffusers folder (scheduler with its prediction type)."""
    check_replaceable(Path(out), overwrite)
    parts, _, _ = load_base(src, prediction, zero_terminal_snr, allow_pickle)
    if parts.base_model_version == SDXL:
        return [save_sdxl_diffusers_folder(Path(out), parts, DTYPES[dtype])]
    folder = save_diffusers_folder(
        Path(out), parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.noise_scheduler.config, DTYPES[dtype]
    )
    return [folder]
