"""The recipe's lora section: the adapter's shape, where it goes, and what it starts from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdtune.recipe.base import TEXT_ENCODER_TARGETS, _Section


class LoraSection(_Section):
    rank: int = Field(16, ge=1, description="LoRA rank (kohya: network_dim).")
    alpha: float = Field(
        16.0, gt=0, description="LoRA alpha; updates are scaled by alpha/rank (kohya: network_alpha)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    preset: Literal["attention", "attention+ff", "locon", "custom"] = Field(
        "attention",
        description="UNet layers that get a LoRA: `attention` (q/k/v/out), `attention+ff` (and the feed-forward), "
        "`locon` (every linear and conv of the transformer, resnet and resampling blocks), or `custom` "
        "(lora.target_modules).",
    )
    target_modules: list[str] | None = Field(
        None, min_length=1, description="With lora.preset: custom, the UNet module names (suffixes) that get a LoRA."
    )
    conv_rank: int | None = Field(None, ge=1, description="Rank of LoRAs on 3x3 convolutions (kohya conv_dim); null: lora.rank.")
    conv_alpha: float | None = Field(None, gt=0, description="Alpha of LoRAs on 3x3 convolutions (kohya conv_alpha); null: lora.alpha.")
    init: Literal["default", "gaussian"] = Field(
        "default", description="LoRA down-projection init: peft's `default` (Kaiming-uniform) or `gaussian`; up starts at 0."
    )
    algorithm: Literal["lora", "loha", "lokr"] = Field(
        "lora",
        description="The adapter: `lora`, or LyCORIS' `loha` (Hadamard product of two low-rank pairs) or `lokr` "
        "(Kronecker product), through peft; exported in the LyCORIS keys both UIs load (hada_*, lokr_*).",
    )
    use_dora: bool = Field(
        False,
        description="With lora.algorithm: lora, train a DoRA (a magnitude per output channel plus a LoRA direction, "
        "peft's use_dora); exported as LyCORIS' `dora_scale` with wd_on_output (see the DoRA notes on which UIs apply it).",
    )
    merge_first: str | None = Field(
        None, description="A kohya LoRA file merged into the base before training, to train a new LoRA on top of it."
    )
    merge_first_weight: float = Field(1.0, description="Strength of lora.merge_first, as in the UIs.")
    text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder (disables the text cache).")
    text_encoder_target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        min_length=1,
        description=f"Text-encoder layers that get a LoRA; any of {', '.join(TEXT_ENCODER_TARGETS)}.",
    )
    sdxl_text_encoders: Literal["both", "te1", "te2"] = Field(
        "both",
        description="SDXL, with lora.text_encoder: which text encoder gets the LoRA: `te1` (CLIP ViT-L, exported as "
        "`lora_te1_`), `te2` (OpenCLIP ViT-bigG, `lora_te2_`) or `both`.",
    )

    @model_validator(mode="after")
    def _preset_or_custom(self) -> LoraSection:
        if self.target_modules is not None and self.preset != "custom":
            raise ValueError(f"lora.target_modules is used only with lora.preset: custom (preset is {self.preset!r})")
        if self.target_modules is None and self.preset == "custom":
            raise ValueError("lora.preset: custom needs lora.target_modules (UNet module names)")
        if self.sdxl_text_encoders != "both" and not self.text_encoder:
            raise ValueError(f"lora.sdxl_text_encoders: {self.sdxl_text_encoders} needs lora.text_encoder: true")
        if self.algorithm != "lora":
            # peft's LoHa/LoKr have rank and module dropout instead, and their own init.
            wrong = {"lora.use_dora: true": self.use_dora, f"lora.dropout: {self.dropout}": self.dropout,
                     f"lora.init: {self.init}": self.init != "default"}
            for setting, bad in wrong.items():
                if bad:
                    raise ValueError(
                        f"{setting} belongs to lora.algorithm: lora, but lora.algorithm is {self.algorithm}; DoRA, "
                        f"dropout on the branch and lora.init exist only for LoRA. Remove {setting.split(':')[0]} "
                        f"(or set lora.algorithm: lora)"
                    )
        return self

    def unet_targets(self) -> list[str]:
        from sdtune.adapters import UNET_PRESETS

        return self.target_modules if self.preset == "custom" else UNET_PRESETS[self.preset]

    @field_validator("text_encoder_target_modules")
    @classmethod
    def _addressable(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if name not in TEXT_ENCODER_TARGETS]
        if bad:
            raise ValueError(
                f"lora.text_encoder_target_modules {bad} cannot be loaded by the UIs; "
                f"use only {list(TEXT_ENCODER_TARGETS)}"
            )
        return value
