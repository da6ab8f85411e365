"""Single-file SD 1.x/2.x checkpoints (LDM layout): read them as diffusers components, write them back.

Reading is offline: the architecture comes from the tensor shapes (widths,
levels, layers, text encoder kind) on top of the shipped SD 1.5 / 2.1 configs
(``sdtune/configs``); what shapes cannot show (attention heads, norm groups)
follows the real models' rules (SD 1: 8 heads; SD 2 and both text encoders:
64-channel heads), unless the file carries our ``sdtune.architecture``
metadata, which files written here do. The prediction type comes from the
markers of rule 6 (``v_pred`` tensor, ``modelspec.prediction_type``), when
the file has them.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import sdtune
from sdtune import atomic
from sdtune.export import ldm_keys as keys
from sdtune.export.markers import flags_from_file
from sdtune.export.metadata import MODELSPEC_ARCHITECTURE, MODELSPEC_IMPLEMENTATION, MODELSPEC_PREDICTION, SDXL
from sdtune.export.sidecars import a1111_yaml, comfyui_workflow
from sdtune.weight_files import read_weights as read_tensors  # the one loading policy (pickles need permission)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Parts of a diffusers config that tensor shapes cannot show; files we write carry them.
HIDDEN_FIELDS = {
    "unet": ("attention_head_dim", "norm_num_groups", "norm_eps", "sample_size", "upcast_attention"),
    "vae": ("norm_num_groups", "sample_size", "scaling_factor"),
    "text_encoder": ("num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id"),
}  # fmt: skip


@dataclass
class Checkpoint:
    """A single-file checkpoint as diffusers state dicts and configs."""

    version: str  # "sd_v1" | "sd_v2" | "sdxl_base_v1-0"
    configs: dict[str, dict]  # unet, vae, text_encoder, scheduler, tokenizer (SDXL: also text_encoder_2, tokenizer_2)
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    # LDM tensors with no diffusers counterpart that a written file must carry
    # again (SD 2: OpenCLIP's unused last resblock, text_projection, logit_scale).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    prediction_type: str | None = None  # what the markers say; None when there are none
    zero_terminal_snr: bool | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # tensors not used (EMA copies, schedule buffers, ...)
    text_encoder_2: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL's OpenCLIP bigG


# Shipped config file of each version (kohya's names; SDXL's file is sdxl.json).
CONFIG_FILES = {"sd_v1": "sd_v1.json", "sd_v2": "sd_v2.json", SDXL: "sdxl.json"}


def base_config(version: str) -> dict[str, dict]:
    configs = json.loads((CONFIG_DIR / CONFIG_FILES[version]).read_text(encoding="utf-8"))
    configs.pop("_comment")
    return configs


def split_ldm(tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, dict[str, torch.Tensor]], list[str]]:
    """The SD version and the LDM tensors of each component; names that belong to none are returned too."""
    if any(k.startswith("lora_") or ".lora_" in k for k in tensors):
        raise ValueError("this file holds LoRA tensors, not a full model; `sdtune inspect FILE` says what it is")
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}, "markers": {}}
    ignored = []
    for key, value in tensors.items():
        if key.startswith("cond_stage_model.transformer.") and not key.startswith(keys.CLIP_PREFIX):
            key = keys.CLIP_PREFIX + key.removeprefix("cond_stage_model.transformer.")  # pre-4.x CLIP names
        if key.startswith(keys.UNET_PREFIX):
            parts["unet"][key] = value
        elif key.startswith(keys.VAE_PREFIX):
            parts["vae"][key] = value
        elif key.startswith((keys.CLIP_PREFIX, keys.OPENCLIP_PREFIX)):
            parts["text_encoder"][key] = value
        elif key in keys.MARKER_KEYS:
            parts["markers"][key] = value
        else:
            ignored.append(key)
    te = parts["text_encoder"]
    if not te and any(k.startswith("conditioner.embedders.") for k in ignored):
        raise ValueError(
            "this is an SDXL-family checkpoint (conditioner.embedders.*): `sdtune inspect` and `sdtune export` read "
            "it; training on it is not wired in yet (use an SD 1.x/2.x base)"
        )
    if any(k.startswith(keys.OPENCLIP_PREFIX) for k in te):
        version = "sd_v2"
    elif any(k.startswith(keys.CLIP_PREFIX) for k in te):
        version = "sd_v1"
    else:
        raise ValueError(
            "no SD 1.x (cond_stage_model.transformer.*) or SD 2.x (cond_stage_model.model.*) text encoder "
            "in this file; sdtune reads SD 1.x/2.x single-file checkpoints (SDXL and others are not supported)"
        )
    if not parts["unet"] or not parts["vae"]:
        missing = [name for name in ("unet", "vae") if not parts[name]]
        raise ValueError(f"this checkpoint has no {' or '.join(missing)} tensors; it is not a full SD model (a LoRA? see `sdtune inspect`)")
    return version, parts, ignored


def configs_from_shapes(version: str, shapes: dict[str, tuple[int, ...]], prediction_type: str | None) -> dict[str, dict]:
    """diffusers configs for the LDM tensor ``shapes`` (full keys), starting from the shipped SD config."""
    configs = base_config(version)
    u, first, attention, fields = unet_fields_from_shapes(shapes)
    widths = fields["block_out_channels"]
    mid_blocks = {k.split(".")[3] for k in u if k.startswith("middle_block.1.transformer_blocks.")}
    unet = configs["unet"]
    unet |= fields | {
        "transformer_layers_per_block": len(mid_blocks),
        # SD 1: 8 heads everywhere; SD 2: 64-channel heads (diffusers calls the head count attention_head_dim).
        "attention_head_dim": 8 if version == "sd_v1" else [max(1, w // 64) for w in widths],
        "sample_size": 96 if (version, prediction_type) == ("sd_v2", "v_prediction") else 64,
    }
    configs["vae"] |= vae_fields_from_shapes(shapes, 8 * unet["sample_size"])
    t = {k: s for k, s in shapes.items() if k.startswith(("cond_stage_model.",))}
    if version == "sd_v1":
        p = keys.CLIP_PREFIX
        layers = 1 + max(int(k.removeprefix(p).split(".")[2]) for k in t if k.startswith(p + "encoder.layers."))
        vocab, hidden = t[p + "embeddings.token_embedding.weight"]
        positions = t[p + "embeddings.position_embedding.weight"][0]
        intermediate = t[p + "encoder.layers.0.mlp.fc1.weight"][0]
    else:
        p = keys.OPENCLIP_PREFIX + "transformer.resblocks."
        blocks = 1 + max(int(k.removeprefix(p).split(".")[0]) for k in t if k.startswith(p))
        # SD 2 runs 23 of OpenCLIP's 24 resblocks (it conditions on the penultimate). Files
        # written by diffusers' converter leave the unused 24th out; others carry it.
        layers = 23 if blocks in (23, 24) else blocks - 1
        vocab, hidden = t[keys.OPENCLIP_PREFIX + "token_embedding.weight"]
        positions = t[keys.OPENCLIP_PREFIX + "positional_embedding"][0]
        intermediate = t[p + "0.mlp.c_fc.weight"][0]
    configs["text_encoder"] |= {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "max_position_embeddings": positions,
        "num_attention_heads": max(1, hidden // 64),
    }
    return configs


def unet_fields_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, list[int], list[bool], dict]:
    """The UNet config fields the LDM UNet tensor ``shapes`` (full keys) show, which SD and SDXL
    share (their UNet keys have one layout); returns (the UNet's shapes by key without the
    prefix, each level's first input block, whether each level has attention, the fields)."""
    u = {k.removeprefix(keys.UNET_PREFIX): s for k, s in shapes.items() if k.startswith(keys.UNET_PREFIX)}
    levels = 1 + sum(1 for k in u if k.startswith("input_blocks.") and k.endswith(".op.weight"))
    last_input = max(int(k.split(".")[1]) for k in u if k.startswith("input_blocks."))
    per_level = (last_input + 1) // levels  # resnets + the downsampler
    first = [1 + i * per_level for i in range(levels)]
    attention = [f"input_blocks.{n}.1.proj_in.weight" in u for n in first]
    return u, first, attention, {
        "in_channels": u["input_blocks.0.0.weight"][1],
        "out_channels": u["out.2.weight"][0],
        "block_out_channels": [u[f"input_blocks.{n}.0.out_layers.3.weight"][0] for n in first],
        "layers_per_block": per_level - 1,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": u["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
        "use_linear_projection": len(u["middle_block.1.proj_in.weight"]) == 2,
    }


def vae_fields_from_shapes(shapes: dict[str, tuple[int, ...]], sample_size: int) -> dict:
    """The VAE config fields the LDM VAE tensor ``shapes`` (full keys) show; SD and SDXL share the layout."""
    v = {k.removeprefix(keys.VAE_PREFIX): s for k, s in shapes.items() if k.startswith(keys.VAE_PREFIX)}
    vae_levels = 1 + max(int(k.split(".")[2]) for k in v if k.startswith("encoder.down."))
    vae_layers = 1 + max(int(k.split(".")[4]) for k in v if k.startswith("encoder.down.0.block."))
    return {
        "in_channels": v["encoder.conv_in.weight"][1],
        "out_channels": v["decoder.conv_out.weight"][0],
        "latent_channels": v["post_quant_conv.weight"][0],
        "block_out_channels": [v[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(vae_levels)],
        "layers_per_block": vae_layers,
        "down_block_types": ["DownEncoderBlock2D"] * vae_levels,
        "up_block_types": ["UpDecoderBlock2D"] * vae_levels,
        "sample_size": sample_size,
    }


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    tensors, metadata = read_tensors(path, allow_pickle)
    version, parts, ignored = split_ldm(tensors)
    prediction_type, ztsnr = flags_from_file(path, set(parts["markers"]), metadata)
    shapes = {k: tuple(v.shape) for part in parts.values() for k, v in part.items()}
    configs = configs_from_shapes(version, shapes, prediction_type)
    stored = json.loads(metadata.get("sdtune.architecture", "{}"))
    for component, hidden in HIDDEN_FIELDS.items():
        configs[component] |= {k: v for k, v in stored.get(component, {}).items() if k in hidden}
    unet_layout = keys.unet_layout(configs["unet"])
    vae_levels, vae_layers = len(configs["vae"]["block_out_channels"]), configs["vae"]["layers_per_block"]
    te_layers = configs["text_encoder"]["num_hidden_layers"]
    extras = {}
    if version == "sd_v1":
        text_encoder = keys.clip_from_ldm(parts["text_encoder"])
    else:
        text_encoder = keys.openclip_from_ldm(parts["text_encoder"], te_layers)
        used = set(keys.openclip_to_ldm(text_encoder, te_layers))
        extras = {k: v for k, v in parts["text_encoder"].items() if k not in used}
    return Checkpoint(
        version=version,
        configs=configs,
        unet=keys.unet_from_ldm(parts["unet"], unet_layout),
        vae=keys.vae_from_ldm(parts["vae"], vae_levels, vae_layers),
        text_encoder=text_encoder,
        extras=extras,
        prediction_type=prediction_type,
        zero_terminal_snr=ztsnr,
        metadata=metadata,
        ignored=ignored,
    )


def build_models(checkpoint: Checkpoint, unet_dtype: torch.dtype = torch.float32):
    """diffusers UNet and VAE and a transformers text encoder holding the checkpoint's tensors (fp32 VAE/TE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = checkpoint.configs
    # Built without initialising weights (meta device), then given the file's tensors.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    _assign(unet, checkpoint.unet, unet_dtype, "UNet")
    _assign(vae, checkpoint.vae, torch.float32, "VAE")
    # CLIP has a non-persistent position_ids buffer the file lacks, so it is built for real.
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    _load(text_encoder, {k: v.float() for k, v in checkpoint.text_encoder.items()}, "text encoder")
    text_encoder.eval()
    return unet, vae, text_encoder


def _assign(model: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    _load(model, {k: v.to(dtype) for k, v in tensors.items()}, what, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: {len(left)} tensor(s) not in the checkpoint, e.g. {left[:3]}")
    model.eval()


def _load(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    result = model.load_state_dict(tensors, strict=False, assign=assign)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the checkpoint's {what} does not match the architecture detected from it: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}; is it an SD 1.x/2.x model?"
        )


def ldm_tensors(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    version: str,
    dtype: torch.dtype = torch.float16,
    extras: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """All weights of a model in the LDM layout, floats cast to ``dtype`` (rule 5)."""
    out = keys.unet_to_ldm(unet.state_dict(), keys.unet_layout(unet.config))
    vae_config = vae.config
    out |= keys.vae_to_ldm(vae.state_dict(), len(vae_config.block_out_channels), vae_config.layers_per_block)
    te_state = text_encoder.state_dict()
    if version == "sd_v1":
        out |= keys.clip_to_ldm(te_state)
    else:
        config = text_encoder.config
        out |= keys.openclip_to_ldm(te_state, config.num_hidden_layers)
        # Carried tensors win; generated ones fill what the base lacked (a 23-block file).
        out |= keys.openclip_extras(config.num_hidden_layers, config.hidden_size, config.intermediate_size, dtype) | (extras or {})
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}


def architecture_metadata(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> str:
    """The config fields tensor shapes cannot show, as JSON (see ``HIDDEN_FIELDS``)."""
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": text_encoder.config.to_dict()}
    return json.dumps({part: {k: configs[part][k] for k in fields if k in configs[part]} for part, fields in HIDDEN_FIELDS.items()})


def save_checkpoint(
    path: str | Path,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    *,
    version: str,
    prediction_type: str,
    zero_terminal_snr: bool,
    dtype: torch.dtype = torch.float16,
    extras: dict[str, torch.Tensor] | None = None,
    title: str | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write a single-file checkpoint with the prediction markers of rule 6; returns every file written.

    v-prediction models also get ``<stem>.yaml`` (A1111 reads it as the model
    config) and ``<stem>.comfyui.json`` (a workflow whose ModelSamplingDiscrete
    node sets v-prediction and zero terminal SNR, which ComfyUI otherwise guesses
    for SD 2 and never assumes for SD 1).
    """
    path = Path(path)
    resolution = 8 * unet.config.sample_size
    written = [write_marked(path, ldm_tensors(unet, vae, text_encoder, version, dtype, extras), version, prediction_type,
                            zero_terminal_snr, resolution, architecture_metadata(unet, vae, text_encoder), title, extra_metadata)]
    if prediction_type == "v_prediction":
        written.append(atomic.write_text(path.with_suffix(".yaml"), a1111_yaml(version, unet.config, vae.config, prediction_type)))
        workflow = comfyui_workflow(path.name, prediction_type, zero_terminal_snr, resolution)
        written.append(atomic.write_text(path.with_name(f"{path.stem}.comfyui.json"), json.dumps(workflow, indent=2)))
    return written


def write_marked(
    path: Path, tensors: dict[str, torch.Tensor], version: str, prediction_type: str, zero_terminal_snr: bool,
    resolution: int, architecture: str, title: str | None, extra_metadata: dict[str, str] | None,
) -> Path:  # fmt: skip
    """``tensors`` as a single file with rule 6's markers: the ``v_pred`` / ``ztsnr``
    tensors (as ComfyUI writes them) and the modelspec metadata of ``version``."""
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors")
    if prediction_type == "v_prediction":
        tensors["v_pred"] = torch.tensor([])
    if zero_terminal_snr:
        tensors["ztsnr"] = torch.tensor([])
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[(version, prediction_type)],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION[version],
        "modelspec.title": title or path.stem,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": MODELSPEC_PREDICTION[prediction_type],
        "modelspec.date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "sdtune.version": sdtune.__version__,
        "sdtune.base_model_version": version,
        "sdtune.zero_terminal_snr": str(zero_terminal_snr),
        "sdtune.architecture": architecture,
    } | (extra_metadata or {})
    return atomic.save_safetensors(tensors, path, metadata)
