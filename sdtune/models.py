"""Load the components of a base model: tokenizer, text encoder, VAE, UNet, schedule."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from sdtune.diffusion import make_noise_scheduler
from sdtune.errors import MissingExtraError, ModelFileError, UserError
from sdtune.export.markers import check_training_flags
from sdtune.hashes import file_sha256, tensors_sha256, weights_sha256
from sdtune.sdxl import SdxlComponents, is_sdxl, load_sdxl_components
from sdtune.weight_files import check_folder, loading_folder

# Precision names (train.mixed_precision, export.dtype) and the dtype each stores weights in.
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    name: str
    sha256: str  # of the UNet and text-encoder weight files: what a LoRA is trained against
    vae_sha256: str
    text_encoder_sha256: str
    base_model_version: str  # "sd_v1" | "sd_v2"
    # Tensors of a single-file base with no diffusers counterpart (SD 2's unused last
    # OpenCLIP block), carried into single files written from this model.
    ldm_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    merged_first: str | None = None  # an earlier LoRA merged in before training (lora.merge_first)


def load_components(
    path: str | Path,
    prediction_type: str,
    zero_terminal_snr: bool,
    unet_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    random_init_seed: int | None = None,
) -> Components | SdxlComponents:
    """Load an SD 1.x/2.x or SDXL model (diffusers folder or single-file checkpoint), with the training schedule set up.

    The VAE and text encoder load in fp32: they fill the caches, whose entries
    must not depend on the training precision. With ``random_init_seed``
    (model.init: random) the UNet and text encoder(s) keep only their
    architecture: their weights are drawn afresh from that seed.
    """
    parts = _load(Path(path), prediction_type, zero_terminal_snr, unet_dtype, allow_pickle)
    return parts if random_init_seed is None else reinitialise(parts, random_init_seed)


def reinitialise(parts: Components | SdxlComponents, seed: int) -> Components | SdxlComponents:
    """``parts`` with a UNet and text encoder(s) of the same architecture and dtype but fresh
    weights, drawn as their classes initialise them, from ``seed`` (the global RNG is left
    as it was). What they are trained against, and the text cache's key, say so."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts.unet = UNet2DConditionModel.from_config(parts.unet.config).to(parts.unet.dtype)
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(parts, name, None)
            if encoder is not None:
                setattr(parts, name, type(encoder)(encoder.config).to(encoder.dtype))
    marker = f"random init seed={seed} of "
    parts.sha256 = hashlib.sha256((marker + parts.sha256).encode()).hexdigest()
    parts.text_encoder_sha256 = hashlib.sha256((marker + parts.text_encoder_sha256).encode()).hexdigest()
    return parts


def _load(path: Path, prediction_type: str, zero_terminal_snr: bool, unet_dtype: torch.dtype,
          allow_pickle: bool) -> Components | SdxlComponents:
    if not path.exists():
        raise FileNotFoundError(
            f"model.path {path} does not exist; point it at a diffusers model folder or a single-file "
            f".safetensors checkpoint, or build the tiny demo model with `sdtune make-tiny {path}`"
        )
    if is_sdxl(path, allow_pickle):  # a second text encoder: SDXL's own loader
        return load_sdxl_components(path, prediction_type, zero_terminal_snr, unet_dtype, allow_pickle)
    if path.is_file():
        return load_single_file(path, prediction_type, zero_terminal_snr, unet_dtype, allow_pickle)
    if not (path / "model_index.json").is_file():
        raise ModelFileError(f"model.path {path} has no model_index.json; it is not a diffusers model folder")
    check_folder(path, allow_pickle)
    with loading_folder(path):
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=unet_dtype)
        base_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    noise_scheduler = make_noise_scheduler(base_config, prediction_type, zero_terminal_snr)
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        name=path.resolve().name,
        sha256=weights_sha256(path / "unet", path / "text_encoder"),
        vae_sha256=weights_sha256(path / "vae"),
        text_encoder_sha256=weights_sha256(path / "text_encoder", path / "tokenizer"),
        base_model_version=base_model_version(text_encoder),
    )


def load_single_file(
    path: Path, prediction_type: str, zero_terminal_snr: bool, unet_dtype: torch.dtype, allow_pickle: bool
) -> Components:
    """A single-file LDM checkpoint (SD 1.x, SD 2.x eps or v), offline: configs and tokenizer ship with sdtune."""
    from sdtune.export.checkpoint import build_models, read_checkpoint
    from sdtune.tiny import clip_tokenizer

    checkpoint = read_checkpoint(path, allow_pickle)
    check_training_flags(path, (checkpoint.prediction_type, checkpoint.zero_terminal_snr), prediction_type, zero_terminal_snr)
    unet, vae, text_encoder = build_models(checkpoint, unet_dtype)
    pad_token = checkpoint.configs["tokenizer"]["pad_token"]
    return Components(
        tokenizer=clip_tokenizer(pad_token),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=make_noise_scheduler(checkpoint.configs["scheduler"], prediction_type, zero_terminal_snr),
        name=path.stem,
        sha256=file_sha256(path),
        vae_sha256=tensors_sha256(checkpoint.vae),
        text_encoder_sha256=tensors_sha256(checkpoint.text_encoder, extra=f"pad={pad_token}"),
        base_model_version=checkpoint.version,
        ldm_extras=checkpoint.extras,
    )


def base_model_version(text_encoder: CLIPTextModel) -> str:
    """SD 2.x uses OpenCLIP ViT-H (gelu, width 1024); SD 1.x uses CLIP ViT-L (quick_gelu, width 768).

    The activation tells them apart at any width (reduced-width test models too).
    """
    config = text_encoder.config
    return "sd_v2" if config.hidden_size == 1024 or config.hidden_act == "gelu" else "sd_v1"


def encode_prompts(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The UNet's conditioning: the text encoder's last hidden state, as SD's pipelines use it.

    (SD 2.x's diffusers text encoder already stops at OpenCLIP's penultimate layer.)
    """
    return text_encoder(input_ids, return_dict=False)[0]


def set_attention(unet: UNet2DConditionModel, kind: str, device: torch.device) -> None:
    """Use PyTorch SDPA, or xformers when asked for (CUDA only, optional extra)."""
    if kind == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
        return
    if importlib.util.find_spec("xformers") is None:
        raise MissingExtraError("train.attention: xformers is not installed; `pip install sdtune[xformers]` or use sdpa")
    if device.type != "cuda":
        raise UserError("train.attention: xformers runs only on CUDA GPUs; use sdpa on this machine")
    unet.enable_xformers_memory_efficient_attention()
