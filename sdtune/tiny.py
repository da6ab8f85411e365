"""Build a tiny random-weight Stable Diffusion model in diffusers format.

No weights can be downloaded here, so demos and tests train a model with SD's
component types and block layout at a fraction of the width: a cross-attention
UNet, an 8x-downsampling AutoencoderKL, a CLIP text encoder and the real CLIP
BPE tokenizer (derived offline, see ``sdtune/clip_bpe``). It writes in seconds
and loads with ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdtune import atomic

CLIP_BPE_DIR = Path(__file__).parent / "clip_bpe"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, built from the files shipped in the package.

    SD 1.x pads with ``<|endoftext|>``; SD 2.x uses the same BPE and pads with ``!`` (id 0).
    """
    with tempfile.TemporaryDirectory() as tmp:
        for name in TOKENIZER_FILES:
            shutil.copy(CLIP_BPE_DIR / name, Path(tmp) / name)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=pad_token)


ARCHES = ("sd_v1", "sd_v2", "sdxl_base_v1-0")
TINY_WIDTHS = (32, 64, 64)


def tiny_unet(cross_attention_dim: int = 32, arch: str = "sd_v1") -> UNet2DConditionModel:
    """SD 1 attention: 8 heads, conv projections. SD 2: 64-channel heads (at least
    one), linear projections in and out of each transformer, as the real models."""
    sd2 = arch == "sd_v2"
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=TINY_WIDTHS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=[max(1, w // 64) for w in TINY_WIDTHS] if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )


def tiny_vae() -> AutoencoderKL:
    # Four blocks, as in SD, so latents are 1/8 of the image side.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_text_encoder(hidden_size: int = 32, arch: str = "sd_v1") -> CLIPTextModel:
    """SD 1's CLIP ViT-L (quick_gelu) or SD 2's OpenCLIP ViT-H (gelu, 64-channel heads, pads with "!")."""
    sd2 = arch == "sd_v2"
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=max(1, hidden_size // 64) if sd2 else 4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if sd2 else 49407,
    )
    return CLIPTextModel(config)


def tiny_scheduler(prediction_type: str) -> DDIMScheduler:
    # SD's training betas; DDIM for inference as SD 2.x ships it.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def make_tiny(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0, arch: str = "sd_v1") -> Path:
    """Write a tiny SD 1.x (``arch="sd_v1"``) or SD 2.x (``"sd_v2"``) pipeline to
    ``out_dir``, atomically: nothing half-written is left."""
    out_dir = Path(out_dir)
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder")
    if arch == "sdxl_base_v1-0":
        return _write_pipeline(tiny_sdxl_pipeline(prediction_type, seed), out_dir, ("tokenizer", "tokenizer_2"))
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(arch=arch),
        tokenizer=clip_tokenizer("!" if arch == "sd_v2" else "<|endoftext|>"),
        unet=tiny_unet(arch=arch),
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _write_pipeline(pipe, out_dir, ("tokenizer",))


def _write_pipeline(pipe, out_dir: Path, tokenizers: tuple[str, ...]) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.tmp_beside(out_dir)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers >= 5 writes only tokenizer.json; kohya and transformers 4
        # read vocab.json + merges.txt, so write the portable pair too.
        for folder in tokenizers:
            for name in TOKENIZER_FILES:
                shutil.copy(CLIP_BPE_DIR / name, tmp / folder / name)
        atomic.publish_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# Reduced widths for models of the real SD 1.5 / 2.1 topology: same blocks, layers,
# attention layout, projection kind and text-encoder depth, a fraction of the width.
REDUCED_WIDTHS = {
    "unet": {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32},
    "vae": {"block_out_channels": [32, 64, 64, 64]},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 128},
}


def reduced_sd(version: str, seed: int = 0):
    """UNet, VAE and text encoder with the topology of SD 1.5 (``sd_v1``) or SD 2.1 (``sd_v2``).

    Built from the shipped real configs with only the widths reduced; head counts
    follow the real models' rules (SD 1: 8 heads, SD 2 and CLIP: 64-channel heads, at
    least one), which is what reading a single file without our metadata assumes.
    """
    from sdtune.export.checkpoint import base_config

    configs = base_config(version)
    unet_config = configs["unet"] | REDUCED_WIDTHS["unet"]
    if version == "sd_v2":
        unet_config["attention_head_dim"] = [max(1, w // 64) for w in unet_config["block_out_channels"]]
    text_config = configs["text_encoder"] | REDUCED_WIDTHS["text_encoder"]
    text_config["num_attention_heads"] = max(1, text_config["hidden_size"] // 64)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(configs["vae"] | REDUCED_WIDTHS["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    # Random init leaves norms at 1/0 and some biases at 0; randomise every tensor so a
    # swapped or dropped one cannot go unnoticed in a comparison.
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and (p == 1).all() else 0.0))
    return unet.eval(), vae.eval(), text_encoder.eval()


# SDXL at reduced width: the real block layout (three levels, two resnets each, no
# attention at the first), transformer depths 2 and 10 (and 10 in the middle), CLIP-L's
# 12 and bigG's 32 text-encoder layers; two encoder widths, so a swap cannot go unseen.
SDXL_WIDTHS = {
    "unet": {"block_out_channels": [32, 64, 64], "addition_time_embed_dim": 8},
    "vae": {"block_out_channels": [32, 64, 64, 64]},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 128},
    "text_encoder_2": {"hidden_size": 64, "intermediate_size": 256, "projection_dim": 64},
}


def reduced_sdxl(seed: int = 0, randomise: bool = True):
    """``(unet, vae, text_encoder, text_encoder_2)`` with SDXL 1.0's topology at reduced width.

    Built from the shipped ``configs/sdxl.json`` with only the widths reduced (64-channel
    heads, at least one). ``randomise`` draws every tensor, norms too, as ``reduced_sd`` does.
    """
    from transformers import CLIPTextModelWithProjection

    from sdtune.export.checkpoint import base_config

    configs = base_config("sdxl_base_v1-0")
    te1 = configs["text_encoder"] | SDXL_WIDTHS["text_encoder"]
    te2 = configs["text_encoder_2"] | SDXL_WIDTHS["text_encoder_2"]
    for config in (te1, te2):
        config["num_attention_heads"] = max(1, config["hidden_size"] // 64)
    unet_config = configs["unet"] | SDXL_WIDTHS["unet"]
    widths = unet_config["block_out_channels"]
    unet_config |= {
        "attention_head_dim": [max(1, w // 64) for w in widths],
        # The UNet attends to both encoders' penultimate states side by side, and its
        # add_embedding reads bigG's pooled projection and the six size/crop numbers.
        "cross_attention_dim": te1["hidden_size"] + te2["hidden_size"],
        "projection_class_embeddings_input_dim": te2["projection_dim"] + 6 * unet_config["addition_time_embed_dim"],
    }
    torch.manual_seed(seed)
    models = (
        UNet2DConditionModel.from_config(unet_config),
        AutoencoderKL.from_config(configs["vae"] | SDXL_WIDTHS["vae"]),
        CLIPTextModel(CLIPTextConfig(**te1)),
        CLIPTextModelWithProjection(CLIPTextConfig(**te2)),
    )
    if randomise:
        with torch.no_grad():
            for model in models:
                for p in model.parameters():
                    p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and (p == 1).all() else 0.0))
    return tuple(model.eval() for model in models)


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionXLPipeline of ``reduced_sdxl`` models, SDXL's tokenizers and Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdtune.export.checkpoint import base_config

    configs = base_config("sdxl_base_v1-0")
    unet, vae, text_encoder, text_encoder_2 = reduced_sdxl(seed, randomise=False)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(configs["tokenizer"]["pad_token"]),
        tokenizer_2=clip_tokenizer(configs["tokenizer_2"]["pad_token"]),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"], prediction_type=prediction_type),
    )
