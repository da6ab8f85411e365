"""The recipe's sections: every field typed, documented, with one default, and checked.

Cross-field rules (zero terminal SNR needs v-prediction, ...) are validated here,
when the recipe loads, not at step 900.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from sdtune.recipe.base import (  # noqa: F401  (re-exported)
    MAX_LEARNING_RATE,
    MAX_RESOLUTION,
    MAX_SEED,
    MAX_TRAIN_SEED,
    PREDICTION_ALIASES,
    TEXT_ENCODER_TARGETS,
    _not_blank,
    _Section,
)
from sdtune.recipe.embedding import EmbeddingSection, check_embedding
from sdtune.recipe.lora import LoraSection


class ModelSection(_Section):
    path: str = Field(
        "models/tiny-base",
        description="Base model: a diffusers folder (model_index.json inside) or a single-file "
        "SD 1.x/2.x `.safetensors` checkpoint (LDM layout, as ComfyUI/A1111 use). The default is "
        "the shipped tiny base that draws the sample's world; `sdtune make-tiny DIR` builds a tiny random one.",
    )
    allow_pickle: bool = Field(
        False,
        description="Allow a `.ckpt` (pickle) base model; its tensors are read with "
        "`torch.load(weights_only=True)`. Prefer converting it to .safetensors.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon",
        description="What the UNet predicts: `epsilon` (SD 1.x, SD 2.x-base) or "
        "`v_prediction` (SD 2.x 768-v). `eps` and `v` are accepted as short forms.",
    )
    zero_terminal_snr: bool = Field(
        False,
        description="Rescale the noise schedule so the last timestep is pure noise "
        "(Lin et al. 2023). Needs v_prediction.",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="`random`: train from scratch: the UNet and text encoder keep model.path's architecture "
        "(and its VAE, tokenizer and schedule) but their weights are drawn afresh from train.seed. "
        "Needs train.method: full.",
    )

    @field_validator("prediction_type", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        return PREDICTION_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ztsnr_needs_v(self) -> ModelSection:
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "model.zero_terminal_snr needs model.prediction_type: v_prediction; an "
                "epsilon model cannot recover the image at SNR 0 (and min-SNR weights "
                "divide by zero there)"
            )
        return self


class SourceSection(_Section):
    path: str = Field(
        description="A folder of images with .txt/.caption files (kohya `N_name` subfolders repeat N times), "
        "a folder with metadata.jsonl/metadata.csv, a `datasets` save_to_disk folder, or a `datasets` name "
        "found in the local cache."
    )
    kind: Literal["auto", "folder", "metadata", "hf"] = Field(
        "auto", description="How to read `path`; `auto` tells the formats apart by the files in it."
    )
    repeats: int = Field(1, ge=1, description="Times each image of this source is seen per epoch (times any kohya folder repeats).")
    prefix: str = Field("", description="Put in front of every caption of this source, e.g. a trigger word; tag shuffling leaves it first.")
    caption_column: str = Field("text", description="Caption column of metadata.jsonl/csv or of a `datasets` dataset.")
    image_column: str = Field("image", description="Image column of a `datasets` dataset (Image feature, bytes or file paths).")
    split: str = Field("train", description="Split of a `datasets` dataset.")
    caption_extensions: list[str] = Field(
        [".txt", ".caption"], min_length=1, description="Caption file suffixes of a folder, tried in this order."
    )
    class_images: bool = Field(
        False, description="DreamBooth class (regularisation) images: trained for prior preservation with weight "
        "train.prior_loss_weight, as many per epoch as there are instance images (kohya's reg folders)."
    )
    class_prompt: str = Field("", description="With class_images: the caption of class images generated with the base model.")
    num_class_images: int = Field(
        0, ge=0, description="With class_images and class_prompt: generate images into this folder until it holds this many."
    )

    @field_validator("path")
    @classmethod
    def _path_given(cls, value: str) -> str:
        return _not_blank(value, "the path")

    @field_validator("caption_extensions")
    @classmethod
    def _suffixes(cls, value: list[str]) -> list[str]:
        bad = [ext for ext in value if not ext.startswith(".") or len(ext) < 2 or any(c in ext for c in "/\\\0")]
        if bad:
            raise ValueError(f"caption_extensions must be file suffixes such as '.txt', got {bad}")
        return value

    @model_validator(mode="after")
    def _class_settings(self) -> SourceSection:
        if (self.class_prompt or self.num_class_images) and not self.class_images:
            raise ValueError(f"class_prompt and num_class_images belong to a class-image source; set class_images: true on the source {self.path}")
        if self.num_class_images and not self.class_prompt.strip():
            raise ValueError(f"num_class_images: {self.num_class_images} generates class images, which needs class_prompt "
                             f"(e.g. 'a photo of a dog') on the source {self.path}")
        return self


class DataSection(_Section):
    path: str | None = Field(
        None,
        description="Shorthand for one folder source with defaults; `datasets/sample` when neither "
        "this nor data.sources is given.",
    )
    sources: list[SourceSection] = Field(
        [], description="Several sources at once, each with its own repeats, prefix and columns; instead of data.path."
    )
    resolution: int = Field(
        512,
        description="Training resolution: buckets have an area of at most resolution^2. "
        f"A multiple of data.bucket_step, from 64 to {MAX_RESOLUTION}.",
    )
    bucket_step: int = Field(
        64, ge=8, description="Bucket sides are multiples of this (a multiple of 8, the VAE's downsampling)."
    )
    bucket_min_side: int | None = Field(None, ge=8, description="Shortest bucket side; null: resolution / 2.")
    bucket_max_side: int | None = Field(None, ge=8, description="Longest bucket side; null: resolution * 2.")
    max_aspect_ratio: float = Field(
        2.0, ge=1.0, description="Longest/shortest side of the most elongated bucket; 1 trains square center crops only."
    )
    max_upscale: float = Field(
        1.0,
        ge=1.0,
        description="An image that must be enlarged more than this to fill its bucket is reported as too small.",
    )
    crop: Literal["center", "random"] = Field(
        "center", description="Where the bucket is cut from the resized image; `random` picks one place per image and seed."
    )
    flip: bool = Field(
        False, description="Also train every image mirrored (cached as its own latent). Not for captions that say left/right."
    )
    caption_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Probability of training a sample with the empty caption (for CFG)."
    )
    shuffle_tags: bool = Field(
        False,
        description="Shuffle comma-separated tags every epoch; the frozen text encoder then runs each step "
        "(its outputs cannot be cached).",
    )
    keep_tokens: int = Field(0, ge=0, description="Tags at the front of a caption that shuffling leaves in place.")
    missing_caption: Literal["fail", "empty", "filename"] = Field(
        "fail", description="Image without a caption: stop and list them, train with an empty caption, or use the file name."
    )
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail",
        description="Unreadable, truncated, empty, too small or extreme images: stop and list them, or train "
        "without them and write the list to <output.dir>/<output.name>.skipped.tsv.",
    )
    validation_split: float = Field(
        0.0, ge=0.0, description="Images held out of training: a fraction (below 1) or a count."
    )
    split_seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of the validation split, apart from train.seed so that every run holds out the same images."
    )
    cache_dir: str | None = Field(
        None,
        description="Where VAE latents and text-encoder outputs are cached, shared by "
        "all runs. Default: $SDTUNE_CACHE or ~/.cache/sdtune.",
    )
    num_workers: int = Field(2, ge=0, description="Data-loader worker processes reading the cache.")
    masks: Literal["none", "files", "alpha"] = Field(
        "none", description="Loss masks: `files` reads `<stem>_mask.png` beside each image (white trains, black is ignored), "
        "`alpha` the image's alpha channel (none: all trained); cached at latent resolution."
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value < 64 or value % 8 or value > MAX_RESOLUTION:
            raise ValueError(f"data.resolution must be a multiple of 8 from 64 to {MAX_RESOLUTION}, got {value}")
        return value

    @field_validator("path")
    @classmethod
    def _path_given(cls, value: str | None) -> str | None:
        return _not_blank(value, "data.path")

    @field_validator("validation_split")
    @classmethod
    def _count_or_fraction(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"data.validation_split is a fraction below 1 or a whole count, got {value}")
        return value

    @model_validator(mode="after")
    def _sources_and_buckets(self) -> DataSection:
        if self.path is not None and self.sources:
            raise ValueError("give data.path (one folder) or data.sources (a list), not both")
        if self.path is None and not self.sources:
            self.path = "datasets/sample"
        if self.sources and all(s.class_images for s in self.sources):
            raise ValueError("every data source has class_images: true; add the instance images (the subject) as a source without it")
        if self.bucket_step % 8:
            raise ValueError(f"data.bucket_step must be a multiple of 8 (the VAE's downsampling), got {self.bucket_step}")
        if self.resolution % self.bucket_step:
            raise ValueError(
                f"data.resolution {self.resolution} is not a multiple of data.bucket_step {self.bucket_step}; "
                f"set data.bucket_step: 8 (or another divisor) or a resolution that is a multiple of it"
            )
        return self


class TrainSection(_Section):
    method: Literal["lora", "full", "textual_inversion"] = Field(
        "lora", description="`lora` trains adapters; `full` trains every UNet weight; `textual_inversion` trains only a new "
        "token's vectors (the embedding section).")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(
        1e-4, gt=0, le=MAX_LEARNING_RATE,
        description=f"Peak learning rate for the UNet parameters (at most {MAX_LEARNING_RATE:g}; prodigy: about 1.0).",
    )
    full_text_encoder: bool = Field(
        False, description="With train.method: full, also train every text-encoder weight (disables the text cache)."
    )
    text_encoder_learning_rate: float | None = Field(
        None, gt=0, le=MAX_LEARNING_RATE,
        description="Learning rate of the text encoder (its LoRA or, in a full fine-tune, its weights), "
        f"at most {MAX_LEARNING_RATE:g}; null: train.learning_rate.",
    )
    text_encoder_steps: int | None = Field(
        None, ge=1, description="Stop training the text encoder after this many steps (what it learnt stays in the output); null: never."
    )
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "one_cycle"
    ] = Field("constant", description="Learning-rate schedule (diffusers get_scheduler; one_cycle: torch OneCycleLR).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (schedules that have one; one_cycle's rise).")
    lr_num_cycles: int = Field(1, ge=1, description="Hard restarts of cosine_with_restarts.")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial decay.")
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "lion", "prodigy"] = Field(
        "adamw",
        description="`adamw` (torch, fused on CUDA), `adamw8bit` (`pip install sdtune[bnb]`), `adafactor` "
        "(transformers, fixed lr), `lion` (`sdtune[lion]`), `prodigy` (`sdtune[prodigy]`; set learning_rate 1.0).",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this; 0 turns clipping off.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast precision; trainable weights stay fp32, frozen ones are stored in it. `bf16` on a "
        "GPU, and on a CPU with native bf16 for SD-sized models (1.85x the steps/s of fp32 at SD 1.5 width); a tiny "
        "model trains faster in fp32 (docs/benchmarks.md)."
    )
    seed: int = Field(42, ge=0, le=MAX_TRAIN_SEED, description="Seed for weights init, data order, noise and timesteps (0 to 2^31 - 1).")
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's choice. null: off. On a v target "
        "it weighs the noisiest steps near 0 (0 at zero terminal SNR): fine to fine-tune, not to train from scratch.",
    )
    debiased_estimation: bool = Field(
        False, description="Weight the loss by 1/sqrt(SNR) in epsilon terms (Yu et al. 2024); instead of min-SNR."
    )
    loss_type: Literal["mse", "huber", "smooth_l1"] = Field(
        "mse", description="`mse`, or pseudo-Huber `huber` / `smooth_l1` that damp outlier errors."
    )
    huber_c: float = Field(0.1, gt=0, description="Scale of the Huber losses: errors below it count quadratically.")
    prior_loss_weight: float = Field(
        1.0, ge=0, description="Weight of the class images' loss (DreamBooth prior preservation; data.sources[].class_images)."
    )
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="How training timesteps are drawn: `uniform`, or `logit_normal` (favours the middle)."
    )
    logit_mean: float = Field(0.0, description="Mean of the logit-normal timestep distribution (> 0: noisier steps).")
    logit_std: float = Field(1.0, gt=0, description="Std of the logit-normal timestep distribution.")
    min_timestep: int = Field(0, ge=0, le=999, description="Lowest training timestep (inclusive, at most 999).")
    max_timestep: int | None = Field(
        None, ge=1, le=1000, description="Highest training timestep (exclusive, at most SD's 1000); null: the schedule's length."
    )
    noise_offset: float = Field(0.0, ge=0, description="Std of a per-channel constant added to the noise; 0: off.")
    noise_offset_random_strength: bool = Field(False, description="Scale the noise offset per sample by U(0, 1).")
    input_perturbation: float = Field(
        0.0, ge=0, description="Extra noise on the model input only (Ning et al. 2023); 0.1 is the paper's value; 0: off."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to save memory.")
    compile: Literal[False, True, "inductor", "aot_eager", "eager"] = Field(
        False, description="torch.compile the UNet the training steps call: `true` or `inductor` makes each step faster "
        "once compiled, but compiling takes minutes (docs/benchmarks.md); `eager` / `aot_eager` only check that it "
        "compiles; `false`: off. Previews, validation, exports and checkpoints use the uncompiled model. Not `inductor` "
        "with bf16 on a CPU, where torch's inductor drops LoRA gradients."
    )
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa", description="`sdpa` (PyTorch scaled_dot_product_attention) or `xformers` (GPU only, optional extra)."
    )
    on_nan: Literal["stop", "skip"] = Field(
        "stop",
        description="A non-finite loss stops the run with nothing written (`stop`, checked at log steps) or its "
        "batch is skipped (`skip`, checked every step, which costs a host sync per step).",
    )
    deterministic: bool = Field(
        False, description="Use only deterministic kernels (torch.use_deterministic_algorithms), for bit-exact repeats."
    )
    log_every: int = Field(10, ge=1, description="Steps between loss logs (the only host syncs in the loop).")
    logger: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Where metrics go.")


    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if self.min_snr_gamma is not None and self.debiased_estimation:
            raise ValueError(
                "train.min_snr_gamma and train.debiased_estimation are two loss weightings; choose one"
            )
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(
                f"train.min_timestep ({self.min_timestep}) must be below train.max_timestep ({self.max_timestep})"
            )
        for name, rate in (("learning_rate", self.learning_rate), ("text_encoder_learning_rate", self.text_encoder_learning_rate)):
            if self.optimizer == "prodigy" and rate is not None and rate < 0.1:
                raise ValueError(
                    f"train.optimizer: prodigy finds the step size itself and expects train.{name} around 1.0, got {rate}"
                )
        if self.lr_scheduler == "one_cycle" and self.max_steps < 4:
            raise ValueError(
                f"train.lr_scheduler: one_cycle needs train.max_steps of at least 4 (a rise and a fall), got {self.max_steps}"
            )
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false.
        return "no" if value is False else value


class EmaSection(_Section):
    enabled: bool = Field(False, description="Keep an exponential moving average of the trained weights and export it.")
    decay: float = Field(0.9999, gt=0, lt=1, description="Largest EMA decay (diffusers EMAModel).")
    warmup: bool = Field(
        False, description="Ramp the decay up as 1 - (1 + step)^(-2/3) (else (1 + step)/(10 + step)), capped at decay."
    )
    update_every: int = Field(1, ge=1, description="Optimizer steps between EMA updates.")


class CheckpointSection(_Section):
    every_steps: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N optimizer steps; null: off.")
    every_epochs: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N passes over the data; null: off.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept under <output.dir>/checkpoints (older ones are deleted).")
    export: bool = Field(True, description="Also write a usable <output.name>-step<N> result at each checkpoint.")


class ValidationSection(_Section):
    every_steps: int = Field(100, ge=1, description="Steps between validation losses on the held-out images (data.validation_split); also at the end.")
    timesteps: list[int] = Field(
        [100, 300, 500, 700, 900], min_length=1, description="Fixed timesteps each held-out image is scored at (logged one by one too)."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the fixed validation noise.")

    @field_validator("timesteps")
    @classmethod
    def _in_schedule(cls, value: list[int]) -> list[int]:
        if any(t < 0 or t > 999 for t in value):
            raise ValueError(f"validation.timesteps must lie in [0, 999], got {value}")
        return value


class PreviewSection(_Section):
    prompts: list[str] = Field([], description="Prompts drawn every preview.every_steps and at the end; empty: no previews.")
    every_steps: int = Field(100, ge=1, description="Steps between preview grids.")
    sampler: Literal["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "heun"] = Field(
        "euler_a", description="Sampler of the previews (zero-terminal-SNR models: ddim, euler, euler_a, dpmpp_2m, unipc)."
    )
    steps: int = Field(20, ge=1, description="Sampling steps per preview image.")
    cfg: float = Field(7.0, ge=0, description="Classifier-free guidance scale.")
    cfg_rescale: float | None = Field(None, ge=0, le=1, description="CFG rescale (Lin et al. 2023); null: 0.7 with zero terminal SNR, else 0.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every preview image, so grids compare across steps.")
    size: int | None = Field(None, ge=64, le=MAX_RESOLUTION, description="Preview side in pixels (a multiple of 8); null: data.resolution.")
    base_row: bool = Field(
        True, description="LoRA runs: a first row drawn with the LoRA switched off (the base model), so each grid compares base and LoRA for the same seeds."
    )

    @field_validator("size")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"preview.size must be a multiple of 8 (the VAE's downsampling), got {value}")
        return value


class OutputSection(_Section):
    dir: str = Field("outputs", description="Folder the results are written to.")
    name: str = Field("sdtune-lora", description="File stem of the results (`<dir>/<name>.safetensors`).")
    overwrite: bool = Field(False, description="Allow replacing results of an earlier run with the same dir and name.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"output.name must be a plain file stem, got {value!r}")
        return value


class ExportSection(_Section):
    dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Precision of the tensors written to disk.")
    formats: list[Literal["single_file", "diffusers"]] = Field(
        ["single_file"],
        min_length=1,
        description="How a full fine-tune is written: `single_file` (`<name>.safetensors` in the LDM "
        "layout ComfyUI/A1111 load, plus `<name>.yaml` and `<name>.comfyui.json` for v-prediction) "
        "and/or `diffusers` (folder `<name>/`). A LoRA run always writes a kohya LoRA file.",
    )


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    train: TrainSection = Field(default_factory=TrainSection)
    ema: EmaSection = Field(default_factory=EmaSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    preview: PreviewSection = Field(default_factory=PreviewSection)
    output: OutputSection = Field(default_factory=OutputSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _cross_section(self) -> Recipe:
        if self.lora.text_encoder and self.train.method != "lora":
            raise ValueError("lora.text_encoder trains a text-encoder LoRA, which needs train.method: lora")
        if self.model.init == "random" and self.train.method != "full":
            raise ValueError(f"model.init: random trains from fresh weights, which needs train.method: full "
                             f"(train.method is {self.train.method}: an adapter on random weights learns nothing usable)")
        if self.train.full_text_encoder and self.train.method != "full":
            raise ValueError("train.full_text_encoder trains all text-encoder weights, which needs train.method: full "
                             "(for a LoRA, use lora.text_encoder: true)")
        check_embedding(self)
        if self.train.prior_loss_weight != 1.0 and not any(s.class_images for s in self.data.sources):
            raise ValueError("train.prior_loss_weight weights the loss of class images, and no data source has them; add a "
                             "source with class_images: true (DreamBooth prior preservation) or leave train.prior_loss_weight at 1")
        if self.model.zero_terminal_snr and self.preview.prompts:
            from sdtune.samplers import (
                SAMPLERS,  # diffusers' schedulers: imported only when previews are asked for
            )

            if not SAMPLERS[self.preview.sampler].zero_terminal_snr:
                usable = [name for name, sampler in SAMPLERS.items() if sampler.zero_terminal_snr]
                raise ValueError(
                    f"preview.sampler {self.preview.sampler} has no zero-terminal-SNR schedule in diffusers "
                    f"(model.zero_terminal_snr is on); use one of {', '.join(usable)}"
                )
        return self

    @property
    def trains_text_encoder(self) -> bool:
        """A text-encoder LoRA, all its weights in a full fine-tune, or a textual inversion's new token rows."""
        return (self.train.method == "lora" and self.lora.text_encoder) or (
            self.train.method == "full" and self.train.full_text_encoder
        ) or self.train.method == "textual_inversion"

    @property
    def caches_text(self) -> bool:
        """Frozen text-encoder outputs are cached unless the encoder trains or tags are shuffled each epoch."""
        return not (self.trains_text_encoder or self.data.shuffle_tags)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
