"""The shipped tiny base (issue 14) judged in pixels (tests/judge.py): models/tiny-base and the
trigger LoRA models/tiny-base-zwx.safetensors, built by ``models/tiny-base/build.sh``
(``sdtune make-tiny models/tiny-base --trained``; a short build runs in test_tiny_base.py).
``python tests/drawing.py`` prints the same rates without asserting; docs/tiny_base.md
has every figure.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors import safe_open

from drawing import HELD_OUT_SCENE, OPEN_PROMPT, SEEDS, SHIPPED_BASE, diffusers_draw, draw, judged, spread, prompt_scenes, trigger_prompts
from judge import judge
from sdtune import world
from sdtune.pipeline import load_pipeline
from sdtune.vae_training import reconstruct
from sdtune.world import HELD_OUT, TRIGGER

SHIPPED_LORA = SHIPPED_BASE.with_name(f"tiny-base-{TRIGGER}.safetensors")
TRIGGER_PROMPTS = trigger_prompts()


@pytest.fixture(scope="module")
def base():
    return load_pipeline(SHIPPED_BASE, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def scenes():
    return prompt_scenes()


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
    # built whole by that one command (VAE included), with every timestep weighted alike
    assert not record["vae_reused"] and record["recipe"]["train"]["min_snr_gamma"] is None


def test_shipped_vae_decodes_the_held_out_pair_it_never_saw():
    """A LoRA can only teach what the VAE can draw. The VAE never saw a pink shape on green
    either; the first shipped one decoded 43 of 64 such images with a white shape, and the
    trigger LoRA of a base on it drew pinkish white (docs/tiny_base.md). Judged on the
    posterior mean's decoding of the trigger set and of new caption combinations."""
    vae = AutoencoderKL.from_pretrained(SHIPPED_BASE / "vae", torch_dtype=torch.float32)
    for scenes in (world.trigger_scenes(64, 0), prompt_scenes(64)):
        images = torch.from_numpy(np.stack([np.asarray(world.render(s)) for s in scenes])).permute(0, 3, 1, 2)
        rates = judged(reconstruct(vae, images), scenes)
        assert rates["all"] >= 0.95, (scenes[0], rates)


def test_shipped_base_draws_the_captions_colours_and_places(base, scenes):
    """16 seeds of prompts in the dataset's grammar (combinations drawn from a seed it never
    trained on): shape colour and background colour both right, and the shape where the
    caption puts it, on at least 80 % with every sampler (16 of 16 here: docs/tiny_base.md).
    The base shipped before it, trained with min-SNR, put the shape where it liked: 6-19 %."""
    prompts = [s.caption for s in scenes]
    for sampler in ("euler_a", "ddim", "dpmpp_2m"):
        rates = judged(draw(base, prompts, SEEDS, sampler=sampler), scenes)
        assert rates["all"] >= 0.8 and rates["position"] >= 0.8, (sampler, rates)


def test_diffusers_pipeline_loads_the_shipped_base_and_it_draws(scenes):
    """diffusers alone, with the scheduler the folder ships (DDIM, trailing, zero terminal SNR)."""
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_BASE, safety_checker=None, dtype=torch.float32)
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    rates = judged(diffusers_draw(SHIPPED_BASE, [s.caption for s in scenes]), scenes)
    assert rates["all"] >= 0.8 and rates["position"] >= 0.8, rates


def test_ddpm_without_its_per_step_noise_collapses(base):
    """The statistic: for one open prompt drawn from 16 seeds, the per-pixel standard deviation
    across the seeds. DDPM's samples differ from seed to seed; without the per-step noise every
    seed lands on the same conditional mean (with zero terminal SNR the first step drops the seed
    entirely), so the spread collapses. The prompt leaves colour, place and background open: a
    base that binds every word of a full caption draws it alike from every seed, noise or not.
    Per-image contrast does not tell them apart here: the world is flat colours either way
    (docs/tiny_base.md)."""
    one = [OPEN_PROMPT] * len(SEEDS)
    noisy = spread(draw(base, one, SEEDS, sampler="ddpm", steps=50))
    mean = spread(draw(base, one, SEEDS, sampler="ddpm", steps=50, ddpm_noise=False))
    assert noisy > 10 and mean < 0.1 * noisy, (mean, noisy)


def test_trigger_lora_teaches_the_held_out_pair(base):
    """The base never saw a pink shape on a green background; the LoRA names it with a trigger
    word. Judged with the LoRA merged by sdtune, and loaded by diffusers' load_lora_weights:
    the independent loader draws what sdtune's merge draws, verdict for verdict (15 of 16 right
    with ancestral Euler, 16 with DDIM: docs/tiny_base.md)."""
    seeds = list(range(len(TRIGGER_PROMPTS)))
    lora = load_pipeline(SHIPPED_BASE, [SHIPPED_LORA], device=torch.device("cpu"))
    scenes = [HELD_OUT_SCENE] * len(seeds)
    without = judged(draw(lora, TRIGGER_PROMPTS, seeds, lora_weight=0.0), scenes)["all"]
    with_lora = judged(draw(lora, TRIGGER_PROMPTS, seeds, lora_weight=1.0), scenes)["all"]
    assert without <= 0.2 and with_lora >= 0.8, (without, with_lora)

    ours = [judge(image) for image in draw(lora, TRIGGER_PROMPTS, seeds, sampler="ddim", lora_weight=1.0)]
    theirs = [judge(image) for image in diffusers_draw(SHIPPED_BASE, TRIGGER_PROMPTS, SHIPPED_LORA)]
    assert [(j.colour, j.background) for j in theirs] == [(j.colour, j.background) for j in ours]
    assert sum((j.colour, j.background) == HELD_OUT for j in theirs) >= 0.8 * len(seeds)
