"""A base model and its LoRAs, ready to sample at any LoRA weight (``sdtune sample``, previews of files).

``load_pipeline`` reads a diffusers folder or a single-file checkpoint, and
kohya or PEFT/diffusers LoRAs; the prediction type and zero terminal SNR come
from the files (``sdtune.export.markers``). ``set_lora_weights`` merges the
LoRAs by the UIs' rule into freshly restored base weights, so weight 0 is the
base model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sdtune import infotext
from sdtune.export.kohya import (
    TE1_PREFIX, TE2_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX, addressable_layers, merge_lora, read_lora_as_kohya, sdxl_unet_table,
)  # fmt: skip
from sdtune.export.lycoris import PARTS
from sdtune.export.markers import flags_from_metadata, stated_flags
from sdtune.hashes import file_sha256, weights_sha256
from sdtune.errors import ModelFileError
from sdtune.samplers import sampling_config
from sdtune.sdxl import is_sdxl
from sdtune.weight_files import check_folder, loading_folder

LORA_KEY_SUFFIXES = tuple(f".{part}" for part in PARTS)  # LoRA's, and DoRA's, LoHa's and LoKr's (LyCORIS keys)


@dataclass
class Lora:
    path: Path
    name: str  # the file's stem: A1111's alias in `<lora:name:weight>` and `Lora hashes`
    short_hash: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


@dataclass
class Model:
    pipe: StableDiffusionPipeline
    name: str
    short_hash: str  # A1111's "Model hash": 10 hex digits
    prediction_type: str
    zero_terminal_snr: bool
    flags_from: str  # which file said so, for the line we print
    sampling_config: dict
    loras: list[Lora]
    # The base weights of every layer a LoRA changes, so any weights can be set again exactly.
    base_weights: dict[str, tuple[torch.nn.Module, torch.Tensor]] = field(repr=False)
    lora_weights: tuple[float, ...] = ()  # what is merged in now
    embeddings: list[tuple[str, str]] = field(default_factory=list)  # (token, A1111's 12-digit short hash) of each --embedding


def read_lora_file(path: str | Path, allow_pickle: bool = False, sdxl: bool = False) -> Lora:
    """A kohya LoRA (what sdtune train writes), or a diffusers/peft one converted to kohya names
    (SDXL's with ``sdxl``: lora_te1_/lora_te2_ and SGM UNet names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    tensors, metadata = read_lora_as_kohya(path, allow_pickle, sdxl=sdxl)
    foreign = [key for key in tensors if not key.endswith(LORA_KEY_SUFFIXES)]
    if foreign:
        raise ValueError(
            f"{path} is not a LoRA sdtune reads (found key {foreign[0]!r}); sdtune sample reads LoRA/LoCon "
            "(lora_down/lora_up/alpha, lora_mid), DoRA (dora_scale), LoHa (hada_*) and LoKr (lokr_*) layers"
        )
    short_hash = infotext.lora_short_hash(path, metadata)
    return Lora(path=path, name=path.stem, short_hash=short_hash, tensors=tensors, metadata=metadata)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    model_path: str | Path,
    lora_paths: list[str | Path] = (),
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Model:
    """Load a base model (diffusers folder or single-file checkpoint) with LoRAs ready to merge at any weight.

    The prediction type and zero terminal SNR come from the files: the LoRAs'
    metadata when it says (a LoRA trained for v-prediction makes the model
    v-prediction), otherwise the base model's scheduler config or single-file
    markers. LoRAs that disagree are an error.
    """
    model_path = Path(model_path)
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if not model_path.exists():
        raise FileNotFoundError(f"--model {model_path} does not exist; point it at a diffusers model folder or a .safetensors checkpoint")
    loras = [read_lora_file(p, allow_pickle, sdxl=is_sdxl(model_path, allow_pickle)) for p in lora_paths]
    names = [lora.name for lora in loras]
    if len(set(names)) != len(names):
        raise ValueError(f"two LoRA files share a name ({', '.join(names)}); prompts and hashes name LoRAs by file name, so rename one")
    prediction, ztsnr = stated_flags(model_path)
    if model_path.is_file():
        pipe, short_hash = load_single_file(model_path, dtype, allow_pickle)
        flags_from = str(model_path)
    else:
        if not (model_path / "model_index.json").is_file():
            raise ModelFileError(f"--model {model_path} has no model_index.json; it is not a diffusers model folder")
        check_folder(model_path, allow_pickle)
        sdxl = is_sdxl(model_path)
        with loading_folder(model_path):
            if sdxl:  # the empty negative prompt encoded, as both UIs and caption dropout have it (not zeros)
                pipe = StableDiffusionXLPipeline.from_pretrained(model_path, dtype=dtype, force_zeros_for_empty_prompt=False)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    model_path, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
                )
        encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
        short_hash = weights_sha256(model_path / "unet", *(model_path / e for e in encoders), model_path / "vae")[:10]
        flags_from = str(model_path / "scheduler" / "scheduler_config.json")
    # A LoRA trained for v-prediction / zero terminal SNR makes the model so: its metadata wins.
    said = [(lora, *flags_from_metadata(lora.metadata)) for lora in loras]
    for kind, column in (("prediction type", 1), ("zero terminal SNR", 2)):
        if len({flags[column] for flags in said if flags[column] is not None}) > 1:
            raise ValueError(f"the LoRAs disagree on {kind} ({', '.join(str(f[0].path) for f in said)}); sample them separately")
    for lora, lora_prediction, lora_ztsnr in said:
        if lora_prediction is not None or lora_ztsnr is not None:
            prediction = prediction if lora_prediction is None else lora_prediction
            ztsnr = ztsnr if lora_ztsnr is None else lora_ztsnr
            flags_from = f"{lora.path} (metadata)"
    prediction, ztsnr = prediction or "epsilon", bool(ztsnr)
    if ztsnr and prediction != "v_prediction":
        raise ValueError(f"{flags_from} says zero terminal SNR with {prediction}; zero terminal SNR needs v-prediction")
    pipe.to(device)
    for lora in loras:
        lora.tensors = {key: value.to(device) for key, value in lora.tensors.items()}
    pipe.set_progress_bar_config(disable=True)  # `sdtune sample` shows one bar over all images
    layers = _lora_layers(pipe)
    base_weights = {}
    for lora in loras:
        names = {key.split(".", 1)[0] for key in lora.tensors}
        unknown = sorted(names - layers.keys())
        if unknown:
            raise ValueError(f"{lora.path} has {len(unknown)} layer(s) this model lacks, e.g. {unknown[0]}; is it for another base model?")
        base_weights |= {name: (layers[name], layers[name].weight.detach().clone()) for name in names}
    return Model(
        pipe=pipe,
        name=model_path.stem if model_path.is_file() else model_path.resolve().name,
        short_hash=short_hash,
        prediction_type=prediction,
        zero_terminal_snr=ztsnr,
        flags_from=flags_from,
        sampling_config=sampling_config(pipe.scheduler.config, prediction, ztsnr),
        loras=loras,
        base_weights=base_weights,
        lora_weights=(0.0,) * len(loras),
    )


def _lora_layers(pipe) -> dict[str, torch.nn.Module]:
    """Every layer a kohya LoRA may address in ``pipe``, by name (SDXL: SGM UNet names, lora_te1_/lora_te2_)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return (addressable_layers(UNET_PREFIX, pipe.unet, sdxl_unet_table(pipe.unet)) | addressable_layers(TE1_PREFIX, pipe.text_encoder)
                | addressable_layers(TE2_PREFIX, pipe.text_encoder_2))
    return addressable_layers(UNET_PREFIX, pipe.unet) | addressable_layers(TEXT_ENCODER_PREFIX, pipe.text_encoder)


def load_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool = False) -> tuple[StableDiffusionPipeline, str]:
    """A single-file (LDM, or SDXL's SGM) checkpoint as a pipeline, offline (sdtune ships the configs),
    with A1111's model hash: the first 10 hex digits of the file's SHA-256."""
    from diffusers import DDIMScheduler

    from sdtune.export.checkpoint import build_models, read_checkpoint
    from sdtune.export.sgm_checkpoint import build_sdxl_models, read_sgm_checkpoint
    from sdtune.tiny import clip_tokenizer

    if is_sdxl(path, allow_pickle):
        checkpoint = read_sgm_checkpoint(path, allow_pickle)
        unet, vae, text_encoder, text_encoder_2 = build_sdxl_models(checkpoint, dtype)
        pipe = StableDiffusionXLPipeline(
            vae=vae.to(dtype), text_encoder=text_encoder.to(dtype), text_encoder_2=text_encoder_2.to(dtype),
            tokenizer=clip_tokenizer(checkpoint.configs["tokenizer"]["pad_token"]),
            tokenizer_2=clip_tokenizer(checkpoint.configs["tokenizer_2"]["pad_token"]),
            unet=unet, scheduler=DDIMScheduler.from_config(checkpoint.configs["scheduler"]), force_zeros_for_empty_prompt=False,
        )
        return pipe, file_sha256(path)[:10]
    checkpoint = read_checkpoint(path, allow_pickle)
    unet, vae, text_encoder = build_models(checkpoint, dtype)
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=clip_tokenizer(checkpoint.configs["tokenizer"]["pad_token"]),
        unet=unet,
        scheduler=DDIMScheduler.from_config(checkpoint.configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, file_sha256(path)[:10]


@torch.no_grad()
def set_lora_weights(model: Model, weights: tuple[float, ...]) -> None:
    """Merge the model's LoRAs at ``weights`` (one each) into freshly restored base weights.

    Merging is the UIs' rule (``merge_lora``); restoring first makes weight 0 the
    base model exactly, and lets a grid move between weights without drift.
    """
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(model.loras):
        raise ValueError(f"{len(weights)} LoRA weights for {len(model.loras)} LoRAs")
    if weights == model.lora_weights:
        return
    for layer, base in model.base_weights.values():
        layer.weight.copy_(base)
    for lora, weight in zip(model.loras, weights):
        merge_lora(lora.tensors, model.pipe.unet, model.pipe.text_encoder, weight, getattr(model.pipe, "text_encoder_2", None))
    model.lora_weights = weights


