"""Drawing with a model and judging what it drew: shared by the trained-base tests and
``python tests/drawing.py`` (which prints every judged rate of the shipped base)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from judge import judge, rates, verdict
from sdtune import world
from sdtune.pipeline import load_pipeline, set_lora_weights
from sdtune.samplers import default_cfg_rescale, generate, make_sampler

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BASE = ROOT / "models" / "tiny-base"
PROMPT_SEED = 999  # prompts from a generator seed the base never trained on (it trained on seed 0's)
SEEDS = list(range(16))
# What a trigger prompt should draw: the pair the base never saw (judged by colour and background).
HELD_OUT_SCENE = {"colour": world.HELD_OUT[0], "background": world.HELD_OUT[1]}
# For DDPM's spread across seeds: a prompt that leaves the colours and the place to the seed.
OPEN_PROMPT = "a circle"


def prompt_scenes(count: int = len(SEEDS)) -> list[world.Scene]:
    """Scenes whose captions are the prompts: the dataset's grammar, new combinations."""
    return world.scenes(count, PROMPT_SEED)


def draw(model, prompts: list[str], seeds: list[int], sampler: str = "euler_a", steps: int = 20, cfg: float = 5.0,
         ddpm_noise: bool = True, lora_weight: float | None = None) -> list[Image.Image]:
    """Images from an ``sdtune.pipeline.Model`` as ``sdtune sample`` draws them (its samplers,
    the model's own prediction type and terminal SNR, CFG rescale 0.7 with zero terminal SNR)."""
    if lora_weight is not None:
        set_lora_weights(model, (lora_weight,) * len(model.loras))
    scheduler = make_sampler(sampler, model.sampling_config, ddpm_noise)
    return generate(model.pipe, prompts, scheduler, steps, cfg, default_cfg_rescale(model.zero_terminal_snr), seeds,
                    (world.SIDE, world.SIDE))


def judged(images: list[Image.Image], scenes: list) -> dict[str, float]:
    return rates([verdict(judge(image), scene) for image, scene in zip(images, scenes)])


def contrast(images: list[Image.Image]) -> float:
    """Mean over images of the per-pixel standard deviation (0-255): how far an image is from
    one flat colour. A collapsed sample is a blurry mean, near flat."""
    return float(np.mean([np.asarray(im, dtype=np.float64).reshape(-1, 3).std(0).mean() for im in images]))


def spread(images: list[Image.Image]) -> float:
    """Per-pixel standard deviation across images, averaged (0-255): for one prompt drawn from
    many seeds, how much the seeds change the picture. A sampler that collapses to the
    conditional mean draws the same picture whatever the seed: 0."""
    return float(np.stack([np.asarray(im, dtype=np.float64) for im in images]).std(0).mean())


def trigger_prompts() -> list[str]:
    """16 prompts that name the held-out pair only by the trigger word."""
    return [f"a {world.TRIGGER} {kind} {where}" for kind in world.KINDS
            for where in ("in the center", "on the left", "at the top", "in the bottom right")]


def diffusers_draw(model_path: Path, prompts: list[str], lora_file: Path | None = None) -> list[Image.Image]:
    """diffusers alone: the folder's own scheduler, ``load_lora_weights`` for the kohya file."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    return pipe(prompts, num_inference_steps=20, guidance_scale=5.0, guidance_rescale=0.7, height=world.SIDE,
                width=world.SIDE, generator=[torch.Generator().manual_seed(s) for s in SEEDS[: len(prompts)]]).images


def black_background_prompts() -> list[str]:
    """16 prompts in the dataset's grammar, each asking for a black background."""
    kinds, colours = world.KINDS, [c for c in world.COLOURS if world.contrasts(c, "black")]
    return [world.caption_for(kinds[i % 4], colours[i % len(colours)], list(world.POSITIONS)[i % 9], "black", False, i % 4)
            for i in range(len(SEEDS))]


def darkness(images: list[Image.Image]) -> dict[str, float]:
    """How dark the backgrounds are: mean luminance (0-255, Rec. 601) of the judge's border
    ring, the share of images whose ring is darker than 10, and how many the judge calls black."""
    rings = []
    for image in images:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
        b = max(1, round(pixels.shape[0] / 16))
        rings.append(np.concatenate([pixels[:b].ravel(), pixels[-b:].ravel(), pixels[:, :b].ravel(), pixels[:, -b:].ravel()]).mean())
    return {"ring_luminance": float(np.mean(rings)), "darker_than_10": float(np.mean([r < 10 for r in rings])),
            "judged_black": float(np.mean([judge(im).background == "black" for im in images]))}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Every judged rate of a trained tiny base (and its trigger LoRA beside it).")
    parser.add_argument("model", type=Path, nargs="?", default=SHIPPED_BASE)
    parser.add_argument("--prompts", type=int, default=len(SEEDS), help="prompts (and seeds 0..N-1) per rate; default 16")
    parser.add_argument("--samplers", nargs="+", default=["euler_a", "ddim", "dpmpp_2m"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args(argv)
    model_path, seeds = args.model, list(range(args.prompts))
    scenes = prompt_scenes(args.prompts)
    model = load_pipeline(model_path, device=torch.device("cpu"))
    prompts = [s.caption for s in scenes]
    print(f"{args.prompts} prompts and seeds, {args.steps} steps, CFG {args.cfg}", flush=True)
    for sampler in args.samplers:
        print(f"base, {sampler}:", judged(draw(model, prompts, seeds, sampler, args.steps, args.cfg), scenes), flush=True)
    if args.prompts == len(SEEDS) and (args.steps, args.cfg) == (20, 5.0):  # diffusers_draw's own settings
        print("base, diffusers StableDiffusionPipeline:", judged(diffusers_draw(model_path, prompts), scenes))
    noisy = draw(model, prompts, seeds, sampler="ddpm", steps=50)
    mean = draw(model, prompts, seeds, sampler="ddpm", steps=50, ddpm_noise=False)
    print("ddpm:", judged(noisy, scenes), "contrast", contrast(noisy))
    print("ddpm --ddpm-no-noise:", judged(mean, scenes), "contrast", contrast(mean))
    for prompt in (OPEN_PROMPT, prompts[0]):
        one = [prompt] * len(SEEDS)
        print(f"{prompt!r} on {len(SEEDS)} seeds, spread across seeds: ddpm",
              spread(draw(model, one, SEEDS, sampler="ddpm", steps=50)), "--ddpm-no-noise",
              spread(draw(model, one, SEEDS, sampler="ddpm", steps=50, ddpm_noise=False)))
    lora_file = model_path.with_name(f"{model_path.name}-{world.TRIGGER}.safetensors")
    if lora_file.is_file():
        prompts, scenes = trigger_prompts(), [HELD_OUT_SCENE] * len(SEEDS)
        with_lora = load_pipeline(model_path, [lora_file], device=torch.device("cpu"))
        for sampler in args.samplers:
            for weight in (0.0, 1.0):
                drawn = draw(with_lora, prompts, SEEDS, sampler, args.steps, args.cfg, lora_weight=weight)
                print(f"trigger prompts, LoRA at {weight:g}, {sampler}:", judged(drawn, scenes), flush=True)
        print("trigger prompts, diffusers load_lora_weights:", judged(diffusers_draw(model_path, prompts, lora_file), scenes))
    for sampler in ("euler_a", "ddim"):
        print(f"black backgrounds, {sampler}:", darkness(draw(model, black_background_prompts(), SEEDS, sampler=sampler)))


if __name__ == "__main__":
    main()
