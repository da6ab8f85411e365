"""SDXL base models: load one (diffusers folder or single SGM file) into its components, and
compute what the UNet is conditioned on, as diffusers' StableDiffusionXLPipeline does.

An SDXL model is an SD model with two text encoders: CLIP ViT-L (``text_encoder``,
``tokenizer``) and OpenCLIP ViT-bigG with a projection (``text_encoder_2``,
``tokenizer_2``, which pads with ``!``). The UNet attends to both encoders'
penultimate hidden states side by side, and adds an embedding of bigG's pooled,
projected output and six size/crop numbers (``add_time_ids``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdtune.diffusion import make_noise_scheduler
from sdtune.errors import ModelFileError, UserError
from sdtune.export.markers import check_training_flags
from sdtune.export.metadata import SDXL
from sdtune.export.sgm_checkpoint import build_sdxl_models, checkpoint_from_sgm, is_sgm
from sdtune.hashes import file_sha256, tensors_sha256, weights_sha256
from sdtune.weight_files import check_folder, is_pickle, loading_folder, read_header, read_weights


@dataclass
class SdxlComponents:
    """An SDXL base model, named like ``models.Components`` where the two agree."""

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    name: str
    sha256: str  # of the UNet and both text encoders' weights: what a LoRA is trained against
    vae_sha256: str
    text_encoder_sha256: str  # both encoders and tokenizers: what the text cache depends on
    base_model_version: str = SDXL
    # Embedder tensors of a single-file base with no diffusers counterpart (CLIP-L's
    # position_ids, bigG's logit_scale), carried into single files written from it.
    ldm_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    merged_first: str | None = None


def is_sdxl(path: str | Path, allow_pickle: bool = False) -> bool:
    """A diffusers SDXL folder (a second text encoder) or an SGM single file (``conditioner.embedders.*``)."""
    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        return index.is_file() and "text_encoder_2" in json.loads(index.read_text(encoding="utf-8"))
    if not path.is_file():
        return False
    if is_pickle(path):
        return allow_pickle and is_sgm(read_weights(path, allow_pickle)[0])
    return path.suffix == ".safetensors" and is_sgm(read_header(path)[0])


def load_sdxl_components(
    path: str | Path,
    prediction_type: str,
    zero_terminal_snr: bool,
    unet_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> SdxlComponents:
    """Load an SDXL model (diffusers folder or SGM single file) with the training schedule set up;
    the VAE and both text encoders in fp32 (they fill the caches)."""
    path = Path(path)
    if path.is_file():
        return _load_single_file(path, prediction_type, zero_terminal_snr, unet_dtype, allow_pickle)
    check_folder(path, allow_pickle)
    with loading_folder(path):
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=unet_dtype)
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    encoders = [path / sub for sub in ("text_encoder", "text_encoder_2")]
    return SdxlComponents(
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        vae=vae,
        unet=unet,
        noise_scheduler=make_noise_scheduler(scheduler_config, prediction_type, zero_terminal_snr),
        name=path.resolve().name,
        sha256=weights_sha256(path / "unet", *encoders),
        vae_sha256=weights_sha256(path / "vae"),
        text_encoder_sha256=weights_sha256(*encoders, path / "tokenizer", path / "tokenizer_2"),
    )


def _load_single_file(path: Path, prediction_type: str, zero_terminal_snr: bool, unet_dtype: torch.dtype, allow_pickle: bool) -> SdxlComponents:
    from sdtune.tiny import clip_tokenizer

    tensors, metadata = read_weights(path, allow_pickle)
    if not is_sgm(tensors):
        raise ModelFileError(f"{path} is not an SDXL-family checkpoint (no conditioner.embedders.* text encoders)")
    checkpoint = checkpoint_from_sgm(path, tensors, metadata)
    del tensors
    check_training_flags(path, (checkpoint.prediction_type, checkpoint.zero_terminal_snr), prediction_type, zero_terminal_snr)
    unet, vae, text_encoder, text_encoder_2 = build_sdxl_models(checkpoint, unet_dtype)
    pads = [checkpoint.configs[sub]["pad_token"] for sub in ("tokenizer", "tokenizer_2")]
    return SdxlComponents(
        tokenizer=clip_tokenizer(pads[0]),
        tokenizer_2=clip_tokenizer(pads[1]),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        vae=vae,
        unet=unet,
        noise_scheduler=make_noise_scheduler(checkpoint.configs["scheduler"], prediction_type, zero_terminal_snr),
        name=path.stem,
        sha256=file_sha256(path),
        vae_sha256=tensors_sha256(checkpoint.vae),
        text_encoder_sha256=tensors_sha256(checkpoint.text_encoder | checkpoint.text_encoder_2, extra=f"pad={pads}"),
        ldm_extras=checkpoint.extras,
    )


def encode_sdxl_prompts(
    text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, input_ids: torch.Tensor, input_ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` builds it: both
    encoders' penultimate hidden states concatenated on the channel axis, and bigG's pooled,
    projected embedding (``text_embeds`` of ``added_cond_kwargs``)."""
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, second.text_embeds


def add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's size/crop conditioning (Podell et al. 2023, section 2.2): original (h, w), the
    top-left (y, x) of the crop taken from it, and the (h, w) trained at, as six numbers."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


class SdxlTextEncoders(torch.nn.Module):
    """SDXL's two text encoders as the one module the trainer handles: one LoRA config adapts
    both (``lora.text_encoder_target_modules``, exported as ``lora_te1_`` / ``lora_te2_``),
    accelerate prepares one model, and a call gives what the UNet needs."""

    def __init__(self, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_sdxl_prompts(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)

    def activation_checkpointing_enable(self) -> None:
        self.text_encoder.activation_checkpointing_enable()
        self.text_encoder_2.activation_checkpointing_enable()


def unused_text_encoder_modules(module: torch.nn.Module | None, trained: str = "both") -> list[str]:
    """Modules of ``text_encoders``' result to leave untrained: those no output depends on,
    CLIP-L's last layer and final layer norm in SDXL (the UNet reads its penultimate hidden
    state; bigG's last layer feeds the pooled embedding, so it stays), and with ``trained``
    ``te1`` or ``te2`` (lora.sdxl_text_encoders) every module of the other encoder. None for SD 1/2."""
    if not isinstance(module, SdxlTextEncoders):
        if trained != "both":
            raise UserError(f"lora.sdxl_text_encoders: {trained} is for SDXL models, which have two text encoders; "
                            "this base has one: remove the setting")
        return []
    layers = next(name for name, m in module.text_encoder.named_modules() if name.endswith("encoder.layers"))
    last = f"text_encoder.{layers}.{len(module.text_encoder.get_submodule(layers)) - 1}."
    norm = next(f"text_encoder.{name}" for name, m in module.text_encoder.named_modules() if name.endswith("final_layer_norm"))
    other = {"both": None, "te1": "text_encoder_2.", "te2": "text_encoder."}[trained]
    return [name for name, _ in module.named_modules() if name.startswith(last) or (other and name.startswith(other))] + [norm]


def text_encoders(parts) -> torch.nn.Module | None:
    """What the trainer treats as the text encoder: SD's, or SDXL's two together (None once freed)."""
    if not isinstance(parts, SdxlComponents) or parts.text_encoder is None:
        return parts.text_encoder
    return SdxlTextEncoders(parts.text_encoder, parts.text_encoder_2)


def split_text_encoders(module: torch.nn.Module | None) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """``(text_encoder, text_encoder_2)`` of what ``text_encoders`` returned (the second None for SD)."""
    if isinstance(module, SdxlTextEncoders):
        return module.text_encoder, module.text_encoder_2
    return module, None
