"""Samplers by name on a model's own schedule, and generating a batch of images.

``make_sampler`` turns a name (``euler_a``, ``dpmpp_2m``, ...) into the diffusers
scheduler on the model's noise schedule with the prediction type and terminal
SNR it was trained for (``sampling_config``); ``generate`` draws one image per
prompt and seed. The trainer's previews and ``sdtune sample`` both use them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from PIL import Image

# Lin et al. 2023, section 3.4: CFG rescale 0.7 keeps a zero-terminal-SNR model from over-exposing.
ZTSNR_CFG_RESCALE = 0.7


class DDPMMeanScheduler(DDPMScheduler):
    """DDPM that steps to the posterior mean and adds no noise: ``--ddpm-no-noise``, a teaching switch.

    DDPM's reverse step is ``x_{t-1} = mu_t(x_t, x0_hat) + sigma_t * z``. Leaving out
    ``sigma_t * z`` looks harmless but is not: each step then lands on the mean of
    what the model believes and the samples collapse toward the conditional mean.
    With zero terminal SNR it is total: the first step's mean weighs ``x_T`` by
    ``sqrt(alpha_T) = 0``, so the seed reaches the image only through the model's
    estimate of ``x0`` from pure noise, which training makes the same for every
    noise: every seed draws the same picture (docs/tiny_base.md measures it).

    This is DDPMScheduler's own step with its variance ``sigma_t^2`` read as 0, so
    ``mu_t`` is diffusers' and nothing is re-derived; its last step lands on
    ``x0_hat`` as DDPM's does. (An earlier version used DDIM with ``eta = 1``, which
    has the same mean but takes ``sqrt(1 - abar_prev - sigma^2)``: with zero terminal
    SNR that is ``sqrt`` of a rounding error below 0 at the first step, and every
    image came out NaN.) tests/test_sample.py checks this step equals DDPMScheduler's
    step minus its noise.
    """

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        return torch.zeros(())


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
        return DDPMMeanScheduler.from_config(config)
    return sampler.scheduler.from_config(config, **dict(sampler.options))


def default_cfg_rescale(zero_terminal_snr: bool) -> float:
    return ZTSNR_CFG_RESCALE if zero_terminal_snr else 0.0


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
