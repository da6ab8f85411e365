"""Files written beside a single-file checkpoint so each UI runs it with the right prediction type (rule 6).

- A1111 / Forge load ``<checkpoint stem>.yaml`` as the model's LDM config when it
  exists (``modules/sd_models_config.py``); ``parameterization: "v"`` in it is
  the only way to tell them an SD 1.x model predicts v, and the sure way for
  SD 2.x (otherwise they guess from a test forward pass). The config is the
  stock ``v1-inference.yaml`` / ``v2-inference-v.yaml`` with this model's widths.
- ComfyUI reads the ``v_pred``/``ztsnr`` markers only for SDXL-family models and
  guesses SD 2 from weights, so a workflow (API format) with
  ``ModelSamplingDiscrete`` after the checkpoint loader states it instead.
"""

from __future__ import annotations

import yaml

# LDM LatentDiffusion settings shared by SD 1.x and 2.x (the stock inference configs).
LATENT_DIFFUSION = {
    "linear_start": 0.00085,
    "linear_end": 0.0120,
    "num_timesteps_cond": 1,
    "log_every_t": 200,
    "timesteps": 1000,
    "first_stage_key": "jpg",
    "cond_stage_key": "txt",
    "image_size": 64,
    "channels": 4,
    "cond_stage_trainable": False,
    "conditioning_key": "crossattn",
    "monitor": "val/loss_simple_ema",
    "scale_factor": 0.18215,
    "use_ema": False,
}
TEXT_ENCODER_TARGET = {
    "sd_v1": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    "sd_v2": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"freeze": True, "layer": "penultimate"}},
}
PARAMETERIZATION = {"epsilon": "eps", "v_prediction": "v"}


def a1111_yaml(version: str, unet_config, vae_config, prediction_type: str) -> str:
    """The LDM inference config of this model, as A1111 reads it from ``<stem>.yaml``."""
    widths = list(unet_config["block_out_channels"])
    attention = [kind.startswith("CrossAttn") for kind in unet_config["down_block_types"]]
    heads = unet_config["attention_head_dim"]
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    unet = {
        "use_checkpoint": True,
        "image_size": 32,  # unused by LDM
        "in_channels": unet_config["in_channels"],
        "out_channels": unet_config["out_channels"],
        "model_channels": widths[0],
        "attention_resolutions": [2**i for i, has in enumerate(attention) if has][::-1],
        "num_res_blocks": unet_config["layers_per_block"],
        "channel_mult": [w // widths[0] for w in widths],
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": unet_config["cross_attention_dim"],
        "legacy": False,
    }
    # LDM takes a fixed head count (SD 1) or a fixed head width (SD 2).
    if len(set(heads)) == 1:
        unet["num_heads"] = heads[0]
    else:
        unet["num_head_channels"] = widths[0] // heads[0]
    if unet_config.get("use_linear_projection"):
        unet["use_linear_in_transformer"] = True
    vae_widths = list(vae_config["block_out_channels"])
    first_stage = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": vae_config["latent_channels"],
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": vae_config["latent_channels"],
                "resolution": 256,
                "in_channels": vae_config["in_channels"],
                "out_ch": vae_config["out_channels"],
                "ch": vae_widths[0],
                "ch_mult": [w // vae_widths[0] for w in vae_widths],
                "num_res_blocks": vae_config["layers_per_block"],
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }
    params = {"parameterization": PARAMETERIZATION[prediction_type]} | LATENT_DIFFUSION
    params |= {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": first_stage,
        "cond_stage_config": TEXT_ENCODER_TARGET[version],
    }
    config = {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
    header = "# Written by sdtune: the LDM config A1111/Forge use for the checkpoint of the same name.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def comfyui_workflow(checkpoint_name: str, prediction_type: str, zero_terminal_snr: bool, resolution: int) -> dict:
    """A text-to-image workflow (ComfyUI API format) that samples the checkpoint with the right settings."""
    sampling = "v_prediction" if prediction_type == "v_prediction" else "eps"
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "2": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": sampling, "zsnr": zero_terminal_snr}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": resolution, "height": resolution, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                "seed": 0, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "denoise": 1.0,
                # Zero terminal SNR needs sampling to start at the last timestep (Lin et al. 2023, 3.3).
                "scheduler": "sgm_uniform" if zero_terminal_snr else "normal",
            },
        },  # fmt: skip
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sdtune"}},
    }
