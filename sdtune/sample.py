"""Generate images with a base model and LoRAs: ``sdtune sample``, X/Y grids, base-vs-fine-tune comparisons.

    sdtune sample --model BASE [--lora FILE[:WEIGHT] ...] --prompt "..." --out DIR
    sdtune sample --model BASE --lora my.safetensors --prompt "..." --grid x=steps:10,20,40 y=cfg:3,7,11 --out DIR
    sdtune sample --model BASE --lora my.safetensors --prompt-file prompts.txt --compare --out DIR

The library half is plain functions the trainer's previews reuse: ``load_pipeline``
(a model and its LoRAs, with prediction type and zero terminal SNR read from the
files), ``make_sampler`` (a diffusers scheduler by name) and ``generate``. The
command half turns the arguments into a list of ``Job``s (one image each), runs
them in batches and writes PNGs carrying A1111-format parameters (``infotext``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from sdtune import grid as grids
from sdtune import infotext
from sdtune.export.kohya import TEXT_ENCODER_PREFIX, UNET_PREFIX, addressable_layers, kohya_name, merge_lora, read_lora
from sdtune.models import weights_sha256

# Lin et al. 2023, section 3.4: CFG rescale 0.7 keeps a zero-terminal-SNR model from over-exposing.
ZTSNR_CFG_RESCALE = 0.7
LORA_KEY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class DDPMMeanScheduler(DDIMScheduler):
    """DDPM that steps to the posterior mean and adds no noise: ``--ddpm-no-noise``, a teaching switch.

    DDPM's reverse step is ``x_{t-1} = mu_t(x_t, x0_hat) + sigma_t * z``. Leaving out
    ``sigma_t * z`` looks harmless but is not: each step then lands on the mean of
    what the model believes, the errors never get re-randomised, and the samples
    collapse toward a blurry average; the contrast is the point of the switch.

    DDIM with ``eta = 1`` has exactly DDPM's posterior variance, so its
    deterministic part is DDPM's ``mu_t`` (Song et al. 2021, eq. 12 and 16); we
    call that public step with the variance noise set to zero rather than
    re-deriving ``mu_t``. ``set_alpha_to_one`` makes the last step land on
    ``x0_hat`` as DDPM's does. tests/test_sample.py checks this step equals
    DDPMScheduler's step minus its noise.
    """

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        return super().step(model_output, timestep, sample, eta=1.0, variance_noise=torch.zeros_like(sample),
                            return_dict=return_dict)


@dataclass(frozen=True)
class Sampler:
    scheduler: type
    a1111_name: str  # what A1111 writes as "Sampler:"
    options: tuple[tuple[str, object], ...] = ()
    zero_terminal_snr: bool = True  # diffusers implements the rescaled schedule for it


SAMPLERS = {
    "ddpm": Sampler(DDPMScheduler, "DDPM"),
    "ddim": Sampler(DDIMScheduler, "DDIM"),
    "euler": Sampler(EulerDiscreteScheduler, "Euler"),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler, "Euler a"),
    "dpmpp_2m": Sampler(DPMSolverMultistepScheduler, "DPM++ 2M", (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    "unipc": Sampler(UniPCMultistepScheduler, "UniPC"),
    "heun": Sampler(HeunDiscreteScheduler, "Heun", zero_terminal_snr=False),
}
SAMPLER_BY_A1111_NAME = {s.a1111_name: name for name, s in SAMPLERS.items()}


def sampling_config(base_config: dict, prediction_type: str, zero_terminal_snr: bool) -> dict:
    """A model's scheduler config with the prediction type and terminal SNR it was trained for.

    Zero terminal SNR samples from the last timestep ("trailing" spacing, Lin et
    al. 2023, section 3.3), the same rule as the training schedule in diffusion.py.
    """
    config = {key: value for key, value in dict(base_config).items() if not key.startswith("_")}
    config["prediction_type"] = prediction_type
    config["rescale_betas_zero_snr"] = zero_terminal_snr
    if zero_terminal_snr:
        config["timestep_spacing"] = "trailing"
    return config


def make_sampler(name: str, config: dict, ddpm_noise: bool = True):
    """The diffusers scheduler called ``name``, on the model's schedule (``sampling_config``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    if config.get("rescale_betas_zero_snr") and not sampler.zero_terminal_snr:
        raise ValueError(f"sampler {name} has no zero-terminal-SNR schedule in diffusers; use euler, dpmpp_2m or ddim")
    if not ddpm_noise:
        if name != "ddpm":
            raise ValueError("--ddpm-no-noise applies to the ddpm sampler only; add --sampler ddpm")
        return DDPMMeanScheduler.from_config(config, set_alpha_to_one=True)
    return sampler.scheduler.from_config(config, **dict(sampler.options))


def default_cfg_rescale(zero_terminal_snr: bool) -> float:
    return ZTSNR_CFG_RESCALE if zero_terminal_snr else 0.0


# --- Reading prediction type and zero terminal SNR from the files -------------------------------

_PREDICTION = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def _true(text: str | None) -> bool | None:
    return None if text is None else text.strip().lower() == "true"


def flags_from_metadata(metadata: dict[str, str]) -> tuple[str | None, bool | None]:
    """``(prediction type, zero terminal SNR)`` from safetensors metadata; None where it says nothing.

    Ours and modelspec first (``modelspec.prediction_type``, ``sdtune.zero_terminal_snr``),
    then kohya's training keys (``ss_v_parameterization``, ``ss_zero_terminal_snr``).
    """
    prediction = _PREDICTION.get(metadata.get("modelspec.prediction_type", "").strip().lower())
    if prediction is None and "ss_v_parameterization" in metadata:
        prediction = "v_prediction" if _true(metadata["ss_v_parameterization"]) else "epsilon"
    ztsnr = _true(metadata.get("sdtune.zero_terminal_snr", metadata.get("ss_zero_terminal_snr")))
    return prediction, ztsnr


def single_file_flags(path: str | Path) -> tuple[str | None, bool | None]:
    """Flags of a single-file checkpoint: the empty ``v_pred`` / ``ztsnr`` marker tensors
    ComfyUI writes, the metadata, and an A1111 ``<file>.yaml`` sidecar's
    ``parameterization: "v"`` (shared/DESIGN.md, rule 6)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None, None
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        prediction, ztsnr = flags_from_metadata(dict(handle.metadata() or {}))
    if "v_pred" in keys:
        prediction = "v_prediction"
    if "ztsnr" in keys:
        ztsnr = True
    sidecar = path.with_suffix(".yaml")
    if prediction is None and sidecar.is_file():
        if re.search(r"""parameterization:\s*["']?v["']?\s*$""", sidecar.read_text(), re.MULTILINE):
            prediction = "v_prediction"
    return prediction, ztsnr


# --- Models and LoRAs ------------------------------------------------------------------------------


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


# diffusers' `save_lora_weights` (peft) files: `<component>.<module path>.lora_A.weight` (down) and
# `.lora_B.weight` (up), alpha in the `lora_adapter_metadata` JSON as `<component>.lora_alpha`.
PEFT_COMPONENTS = {"unet": UNET_PREFIX, "text_encoder": TEXT_ENCODER_PREFIX}
PEFT_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def kohya_from_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> dict[str, torch.Tensor]:
    """A diffusers/peft SD 1.x/2.x LoRA under kohya names, so it merges by the same rule.

    Without a recorded alpha the scale is 1 (alpha = rank), as diffusers loads it.
    """
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    if any(adapter.get(f"{component}.alpha_pattern") for component in PEFT_COMPONENTS):
        raise ValueError(f"{path} sets per-layer alphas (alpha_pattern), which sdtune sample does not read")
    kohya = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in PEFT_SUFFIXES if rest.endswith(s)), None)
        if component not in PEFT_COMPONENTS or suffix is None:
            raise ValueError(f"{path}: key {key!r} is neither kohya (lora_unet_*, lora_te_*) nor diffusers/peft "
                             "(unet.*.lora_A.weight, text_encoder.*.lora_B.weight); sdtune sample cannot read it")
        name = kohya_name(PEFT_COMPONENTS[component], rest.removesuffix(suffix))
        kohya[name + PEFT_SUFFIXES[suffix]] = value
        if adapter.get(f"{component}.lora_alpha") is not None:
            kohya[f"{name}.alpha"] = torch.tensor(float(adapter[f"{component}.lora_alpha"]))
    return kohya


def read_lora_file(path: str | Path) -> Lora:
    """A kohya LoRA (what sdtune train writes), or a diffusers/peft one converted to kohya names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    tensors, metadata = read_lora(path)
    if not any(key.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX)) for key in tensors):
        tensors = kohya_from_peft(tensors, metadata, path)
    foreign = [key for key in tensors if not key.endswith(LORA_KEY_SUFFIXES)]
    if foreign:
        raise ValueError(
            f"{path} is not a plain LoRA (found key {foreign[0]!r}); sdtune sample reads lora_down/lora_up/alpha "
            "layers (LoCon/LoHa/LoKr and DoRA files are not supported)"
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
    loras = [read_lora_file(p) for p in lora_paths]
    names = [lora.name for lora in loras]
    if len(set(names)) != len(names):
        raise ValueError(f"two LoRA files share a name ({', '.join(names)}); prompts and hashes name LoRAs by file name, so rename one")
    if model_path.is_file():
        prediction, ztsnr = single_file_flags(model_path)
        pipe, short_hash = load_single_file(model_path, dtype)
        flags_from = str(model_path)
    else:
        if not (model_path / "model_index.json").is_file():
            raise ValueError(f"--model {model_path} has no model_index.json; it is not a diffusers model folder")
        pipe = StableDiffusionPipeline.from_pretrained(
            model_path, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        ztsnr = bool(pipe.scheduler.config.get("rescale_betas_zero_snr", False))
        short_hash = weights_sha256(model_path / "unet", model_path / "text_encoder", model_path / "vae")[:10]
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
    layers = addressable_layers(UNET_PREFIX, pipe.unet) | addressable_layers(TEXT_ENCODER_PREFIX, pipe.text_encoder)
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


def load_single_file(path: Path, dtype: torch.dtype) -> tuple[StableDiffusionPipeline, str]:
    """A single-file (LDM) checkpoint as a pipeline, offline (sdtune ships the configs),
    with A1111's model hash: the first 10 hex digits of the file's SHA-256."""
    from diffusers import DDIMScheduler

    from sdtune.export.checkpoint import build_models, read_checkpoint
    from sdtune.models import file_sha256
    from sdtune.tiny import clip_tokenizer

    checkpoint = read_checkpoint(path)
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
        merge_lora(lora.tensors, model.pipe.unet, model.pipe.text_encoder, weight)
    model.lora_weights = weights


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    sampler,
    steps: int,
    cfg: float,
    cfg_rescale: float,
    seeds: list[int],
    size: tuple[int, int],
    negative_prompts: list[str] | None = None,
) -> list[Image.Image]:
    """One image per prompt and seed. ``sampler`` is a diffusers scheduler (``make_sampler``);
    it becomes ``pipe.scheduler``.

    Each image's starting noise comes from a CPU generator seeded with its seed,
    so a seed gives the same start on any device and in any batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    pipe.scheduler = sampler
    width, height = size
    return pipe(
        prompt=list(prompts),
        negative_prompt=list(negative_prompts) if negative_prompts and any(negative_prompts) else None,
        num_inference_steps=steps,
        guidance_scale=cfg,
        guidance_rescale=cfg_rescale,
        width=width,
        height=height,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        output_type="pil",
    ).images


# --- Jobs: one image each, and the infotext that describes it ----------------------------------


@dataclass(frozen=True)
class Job:
    prompt: str
    negative: str
    sampler: str
    steps: int
    cfg: float
    cfg_rescale: float
    seed: int
    width: int
    height: int
    loras: tuple[tuple[str, float], ...] = ()  # (name, weight) of each LoRA of the model
    ddpm_noise: bool = True


_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([^>]+)>")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def job_parameters(job: Job, model: Model) -> str:
    """The A1111 infotext of ``job``'s image. Active LoRAs appear as ``<lora:name:weight>``
    in the prompt, as A1111 users type them, and in ``Lora hashes``."""
    active = [(name, weight) for name, weight in job.loras if weight != 0]
    hashes = {lora.name: lora.short_hash for lora in model.loras}
    params = {
        "Steps": job.steps,
        "Sampler": SAMPLERS[job.sampler].a1111_name,
        "CFG scale": _number(job.cfg),
        "Seed": job.seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": model.short_hash,
        "Model": model.name,
        # The name the CFG-rescale extension for A1111 reads.
        "CFG Rescale phi": _number(job.cfg_rescale) if job.cfg_rescale else None,
        "Lora hashes": ", ".join(f"{infotext.lora_alias(n)}: {hashes[n]}" for n, _ in active) or None,
        "DDPM noise": None if job.ddpm_noise else "off",
        "RNG": "CPU",  # initial noise from torch's CPU generator, as A1111's "CPU" setting draws it
    }
    prompt = job.prompt + "".join(f" <lora:{name}:{_number(weight)}>" for name, weight in active)
    return infotext.format_parameters(prompt, job.negative, params)


def job_from_parameters(text: str) -> Job:
    """Read an infotext back into a ``Job`` (LoRAs: those named in the prompt's tags)."""
    prompt, negative, params = infotext.parse_parameters(text)
    loras = tuple((name, float(weight)) for name, weight in _LORA_TAG.findall(prompt))
    width, _, height = params["Size"].partition("x")
    sampler = params["Sampler"]
    if sampler not in SAMPLER_BY_A1111_NAME:
        raise ValueError(f"sampler {sampler!r} is not one sdtune has; it has {', '.join(SAMPLER_BY_A1111_NAME)}")
    return Job(
        prompt=_LORA_TAG.sub("", prompt).strip(),
        negative=negative,
        sampler=SAMPLER_BY_A1111_NAME[sampler],
        steps=int(params["Steps"]),
        cfg=float(params["CFG scale"]),
        cfg_rescale=float(params.get("CFG Rescale phi", 0)),
        seed=int(params["Seed"]),
        width=int(width),
        height=int(height),
        loras=loras,
        ddpm_noise=params.get("DDPM noise") != "off",
    )


def run_jobs(models: list[Model], tasks: list[tuple[int, Job]], batch_size: int, progress=None) -> dict:
    """Generate each ``(model index, job)`` once, in batches of jobs that differ only
    in prompt and seed; returns ``{task: image}``."""
    def setting(task):
        m, job = task
        return (m, job.loras, job.sampler, job.steps, job.cfg, job.cfg_rescale, job.width, job.height, job.ddpm_noise)

    groups: dict[tuple, list] = {}
    for task in dict.fromkeys(tasks):  # each task once, in first-seen order
        groups.setdefault(setting(task), []).append(task)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    images = {}
    for batch in batches:
        m, job = batch[0]
        model = models[m]
        set_lora_weights(model, tuple(weight for _, weight in job.loras))
        sampler = make_sampler(job.sampler, model.sampling_config, job.ddpm_noise)
        out = generate(
            model.pipe, [j.prompt for _, j in batch], sampler, job.steps, job.cfg, job.cfg_rescale,
            [j.seed for _, j in batch], (job.width, job.height), [j.negative for _, j in batch],
        )
        images.update(zip(batch, out))
        if progress is not None:
            progress.update(len(batch))
    return images


def apply_axis(job: Job, axis: str, value) -> Job:
    if axis == "lora":
        if not job.loras:
            raise ValueError("grid axis lora needs at least one --lora")
        return dataclasses.replace(job, loras=tuple((name, value) for name, _ in job.loras))
    if axis == "sampler" and value not in SAMPLERS:
        raise ValueError(f"grid axis sampler: unknown sampler {value!r}; choose from {', '.join(SAMPLERS)}")
    return dataclasses.replace(job, **{axis: value})


# --- The command ----------------------------------------------------------------------------------


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]``; a colon that is part of the path (``C:\\x``) is kept."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or int(match[1]) % 8 or int(match[2]) % 8:
        raise ValueError(f"--size {text!r}: write WxH with both multiples of 8 (the VAE downsamples 8x), e.g. 512x512")
    return int(match[1]), int(match[2])


def next_index(out: Path) -> int:
    """A1111-style numbering: new images continue after the highest ``NNNNN-`` in the folder."""
    numbers = [int(m[1]) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdtune sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model: a diffusers folder (single-file checkpoints: soon)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="LoRA file (kohya or diffusers), weight 1 unless given; repeatable")
    parser.add_argument("--prompt", action="append", default=[], help="prompt; repeatable")
    parser.add_argument("--prompt-file", help="file of prompts, one a line (blank lines skipped)")
    parser.add_argument("--negative", default="", help="negative prompt, for every image")
    parser.add_argument("--sampler", default="euler_a", choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    parser.add_argument("--cfg-rescale", type=float, default=None, help="guidance rescale phi (default: 0.7 for a zero-terminal-SNR model, else 0)")
    parser.add_argument("--seed", type=int, default=-1, help="seed of the first image; each prompt's N images use seed..seed+N-1 (default: random)")
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="image size (default: the model's native size)")
    parser.add_argument("--grid", nargs="+", metavar="x=AXIS:V1,V2", help="X/Y plot: x=steps:10,20,40 [y=cfg:3,7,11]; axes: " + ", ".join(grids.AXES))
    parser.add_argument("--compare", nargs="?", const=True, default=None, metavar="BASE",
                        help="base vs fine-tune side by side, same seeds: alone, the LoRAs off vs on; with a model folder, that base vs --model")
    parser.add_argument("--ddpm-no-noise", action="store_true",
                        help="teaching switch: DDPM without its per-step noise (samples collapse toward the mean); needs --sampler ddpm")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", required=True, help="output folder (existing images are kept; numbering continues)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    diffusers_logging.disable_progress_bar()  # per-component "Loading" bars hide ours
    transformers_logging.disable_progress_bar()
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.strip() for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    axes = _grid_axes(args.grid or [])
    if not prompts and not any(a.name == "prompt" for a in axes.values()):
        raise ValueError("nothing to generate: give --prompt, --prompt-file or a grid axis prompt:...")
    if args.grid and args.compare:
        raise ValueError("--grid and --compare each write one grid; use one at a time")
    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise ValueError("--n, --steps and --batch-size must be at least 1")

    loras = [parse_lora_arg(text) for text in args.lora]
    models = [load_pipeline(args.model, [path for path, _ in loras])]
    if isinstance(args.compare, str):
        models.append(load_pipeline(args.compare))
    elif args.compare and not loras:
        raise ValueError("--compare alone compares the LoRAs off and on; add --lora FILE, or name a base model: --compare BASE")
    model = models[0]
    _report_flags(model)
    seed = args.seed if args.seed >= 0 else random.randrange(2**32)
    width, height = args.size or _native_size(model.pipe)
    base = Job(
        prompt=prompts[0] if prompts else "",
        negative=args.negative,
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
        cfg_rescale=args.cfg_rescale if args.cfg_rescale is not None else default_cfg_rescale(model.zero_terminal_snr),
        seed=seed,
        width=width,
        height=height,
        loras=tuple((lora.name, weight) for lora, (_, weight) in zip(model.loras, loras)),
        ddpm_noise=not args.ddpm_no_noise,
    )
    make_sampler(base.sampler, model.sampling_config, base.ddpm_noise)  # a bad combination fails before any work
    starts = [dataclasses.replace(base, prompt=p, seed=seed + i) for p in (prompts or [""]) for i in range(args.n)]

    # A figure is rows x columns of (model index, job) with column and row labels.
    figures: list[tuple[list[list[tuple[int, Job]]], list[str], list[str]]] = []
    if axes:
        if any(axis.name == "prompt" for axis in axes.values()):
            starts = starts[: args.n]  # the axis supplies the prompts
        figures = [_axes_figure(start, axes) for start in starts]
    elif args.compare:
        figures = [_compare_figure(starts, models)]
    tasks = [task for rows, _, _ in figures for row in rows for task in row] or [(0, job) for job in starts]

    with tqdm(total=len(set(tasks)), unit="image", desc="sampling") as bar:
        images = run_jobs(models, tasks, args.batch_size, bar)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = next_index(out)
    written, parameters = [], {}
    for task in dict.fromkeys(tasks):  # first-seen order, each image once
        m, job = task
        parameters[task] = job_parameters(job, models[m])
        written.append(infotext.save_png(images[task], out / f"{index:05d}-{job.seed}.png", parameters[task]))
        index += 1
    kind = "grid" if axes else "compare"
    for rows, column_labels, row_labels in figures:
        figure = grids.draw_grid([[images[task] for task in row] for row in rows], column_labels, row_labels)
        number = next(n for n in range(10**4) if not (out / f"{kind}-{n:04d}.png").exists())
        # A1111 stores the first cell's parameters with a grid.
        written.append(infotext.save_png(figure, out / f"{kind}-{number:04d}.png", parameters[rows[0][0]]))
    print(f"sdtune: wrote {len(parameters)} image(s) to {out}")
    for path in written[len(parameters) :]:
        print(f"sdtune: {kind} {path}")
    return written


def _grid_axes(specs: list[str]) -> dict[str, grids.Axis]:
    axes = {}
    for spec in specs:
        which, sep, rest = spec.partition("=")
        if not sep or which not in ("x", "y") or which in axes:
            raise ValueError(f"--grid {spec!r}: write x=AXIS:V1,V2,... and optionally y=AXIS:V1,V2,..., once each")
        axes[which] = grids.parse_axis(rest)
    if axes and "x" not in axes:
        raise ValueError("--grid needs an x= axis")
    if len(axes) == 2 and axes["x"].name == axes["y"].name:
        raise ValueError(f"--grid x and y both vary {axes['x'].name}; choose two different axes")
    return axes


def _axes_figure(start: Job, axes: dict[str, grids.Axis]):
    x, y = axes["x"], axes.get("y")
    row_values = y.values if y else (None,)
    rows = [
        [(0, apply_axis(apply_axis(start, y.name, yv) if y else start, x.name, xv)) for xv in x.values]
        for yv in row_values
    ]
    return rows, [grids.axis_label(x, v) for v in x.values], [grids.axis_label(y, v) for v in y.values] if y else []


def _compare_figure(starts: list[Job], models: list[Model]):
    """Rows of (base, fine-tune) for the same job. The base is a second model when one
    was named, else the same model with its LoRAs at weight 0, which is the base exactly."""
    fine_tune = models[0]
    if len(models) > 1:
        base = [(1, dataclasses.replace(job, loras=())) for job in starts]
        labels = [f"base: {models[1].name}", f"fine-tune: {fine_tune.name}"]
    else:
        base = [(0, dataclasses.replace(job, loras=tuple((name, 0.0) for name, _ in job.loras))) for job in starts]
        labels = [f"base: {fine_tune.name}", f"fine-tune: {' + '.join(lora.name for lora in fine_tune.loras)}"]
    rows = [[left, (0, job)] for left, job in zip(base, starts)]
    return rows, labels, [f"seed {job.seed}: {job.prompt}" for job in starts]


def _native_size(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def _report_flags(model: Model) -> None:
    if model.zero_terminal_snr:
        how = f"{model.prediction_type} with zero terminal SNR (trailing timesteps, CFG rescale {ZTSNR_CFG_RESCALE} unless --cfg-rescale)"
    else:
        how = model.prediction_type
    print(f"sdtune: sampling {model.name} as {how}, from {model.flags_from}")

