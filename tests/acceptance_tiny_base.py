"""Acceptance check of a trained tiny base (issue 14), run explicitly:

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/acceptance_tiny_base.py

It judges models/tiny-base and models/tiny-base-zwx.safetensors (built by
``models/tiny-base/build.sh``, i.e. ``sdtune make-tiny models/tiny-base --trained``)
in pixels (tests/judge.py) against the issue's thresholds. It is not named
``test_*.py`` because the weights are not shipped yet: the build of 2026-12-05
(3000 steps of 16) draws the right shape and background colours on 19 % of the
16 prompts, not 80 % (docs/tiny_base.md has every figure), and weights that do
not pass are not committed. Rename it to test_tiny_base_draws.py when they do.
``python tests/drawing.py`` prints the same rates without asserting.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from drawing import SEEDS, SHIPPED_BASE, contrast, diffusers_draw, draw, judged, test_scenes, trigger_prompts
from judge import judge
from sdtune.pipeline import load_pipeline
from sdtune.world import HELD_OUT, TRIGGER

SHIPPED_LORA = SHIPPED_BASE.with_name(f"tiny-base-{TRIGGER}.safetensors")
# Without the trigger's LoRA, what the base draws for a trigger prompt: any scene but the held-out one.
TRIGGER_SCENE = {"colour": HELD_OUT[0], "background": HELD_OUT[1]}
TRIGGER_PROMPTS = trigger_prompts()


@pytest.fixture(scope="module")
def base():
    return load_pipeline(SHIPPED_BASE, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def scenes():
    return test_scenes()


def test_shipped_base_is_small_fp16_and_records_its_build():
    weights = sorted(SHIPPED_BASE.glob("*/*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) < 8_000_000
    for path in weights:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    record = json.loads((SHIPPED_BASE / "tiny-base.build.json").read_text())
    assert record["recipe"]["train"]["method"] == "full" and record["unet_steps"] == record["recipe"]["train"]["max_steps"]
    assert (SHIPPED_BASE / "build.sh").read_text().count("make-tiny") == 1


def test_shipped_base_draws_the_captions_colours(base, scenes):
    """16 seeds of prompts in the dataset's grammar (combinations drawn from a seed it never
    trained on): shape colour and background colour both right on at least 80 %."""
    rates = judged(draw(base, [s.caption for s in scenes], SEEDS), scenes)
    assert rates["all"] >= 0.8, rates


def test_diffusers_pipeline_loads_the_shipped_base_and_it_draws(scenes):
    """diffusers alone, with the scheduler the folder ships (DDIM, trailing, zero terminal SNR)."""
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_BASE, safety_checker=None, dtype=torch.float32)
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    images = diffusers_draw(SHIPPED_BASE, [s.caption for s in scenes])
    assert judged(images, scenes)["all"] >= 0.8


def test_ddpm_without_its_per_step_noise_collapses(base, scenes):
    """The statistic: mean per-image pixel standard deviation (contrast). DDPM's samples keep
    the flat-colour world's contrast; without the noise they shrink toward a flat blur, and
    the judge no longer finds their shapes."""
    prompts = [s.caption for s in scenes]
    noisy = draw(base, prompts, SEEDS, sampler="ddpm", steps=50)
    mean = draw(base, prompts, SEEDS, sampler="ddpm", steps=50, ddpm_noise=False)
    assert all(np.isfinite(np.asarray(im, dtype=float)).all() for im in mean)
    assert contrast(mean) < 0.6 * contrast(noisy), (contrast(mean), contrast(noisy))
    assert judged(mean, scenes)["colour"] < judged(noisy, scenes)["colour"]


def test_trigger_lora_teaches_the_held_out_pair(base):
    """The base never saw a pink shape on a green background; the LoRA names it with a trigger
    word. Judged with the LoRA merged by sdtune, and loaded by diffusers' load_lora_weights."""
    seeds = list(range(len(TRIGGER_PROMPTS)))
    lora = load_pipeline(SHIPPED_BASE, [SHIPPED_LORA], device=torch.device("cpu"))
    scenes = [TRIGGER_SCENE] * len(seeds)
    without = judged(draw(lora, TRIGGER_PROMPTS, seeds, lora_weight=0.0), scenes)["all"]
    with_lora = judged(draw(lora, TRIGGER_PROMPTS, seeds, lora_weight=1.0), scenes)["all"]
    assert without <= 0.2 and with_lora >= 0.8, (without, with_lora)

    images = diffusers_draw(SHIPPED_BASE, TRIGGER_PROMPTS, SHIPPED_LORA)
    assert judged(images, scenes)["all"] >= 0.8
    assert judge(images[0]).colour == HELD_OUT[0]
