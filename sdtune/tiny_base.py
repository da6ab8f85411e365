"""``sdtune make-tiny DIR --trained``: a tiny base model trained from scratch that really draws.

The random tiny model (``sdtune.tiny``) has SD's structure and no knowledge, so
its samples are coloured noise. This builds one that draws the sample's world
(coloured shapes on coloured backgrounds, where the caption says), in three
stages, each reproducible from one seed:

1. the training set: ``sdtune.world`` scenes, generated into ``<DIR>-build/data``;
2. the VAE, trained from random weights on those images (``sdtune.vae_training``:
   reconstruction + KL, then the latent scaling factor), written with a freshly
   initialised UNet and text encoder as the starting model ``<DIR>-build/start``;
3. the UNet and text encoder, trained from that random start by the normal
   trainer with ``recipes/tiny_base.yaml`` (a full fine-tune: EMA, caption
   dropout, one-cycle, previews, validation loss, report.html), on the latents
   it caches with the trained VAE.

The result is the trainer's diffusers folder, published at ``DIR`` (a single
file is beside it in ``<DIR>-build``). It is a normal SD 1.x-style model:
``sdtune sample``, ``StableDiffusionPipeline.from_pretrained`` and
``sdtune export checkpoint`` take it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from sdtune import atomic, world
from sdtune.tiny import CLIP_BPE_DIR, TOKENIZER_FILES, clip_tokenizer, tiny_scheduler, tiny_text_encoder, tiny_unet
from sdtune.vae_training import load_images, train_vae

BASE_RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny_base.yaml"  # shipped with the package
BUILD_FILE = "tiny-base.build.json"  # what the build did and how long each stage took


def tiny_base_vae() -> AutoencoderKL:
    """SD's four-level AutoencoderKL (8x downsampling, 4 latent channels) at a width that
    trains on one CPU core in minutes. One normalisation group: GroupNorm with a group per
    few channels erases a flat image's colour (every channel of a flat area normalises
    to the same value), which is all this world is made of."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=1, sample_size=world.SIDE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
    )


START_FILE = "sdtune-start.json"  # in the starting model: what it was made from


def _reusable_start(start: Path, made_from: dict) -> dict | None:
    """The VAE record of an existing starting model made from the same settings, else None."""
    try:
        record = json.loads((start / START_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record["vae"] if {k: record.get(k) for k in made_from} == made_from else None


def train_base_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, seed: int) -> dict:
    """The base's VAE in two stages on whole images: ``steps`` plain ones, then 3/8 as many at
    a quarter of the learning rate with the shapes' pixels weighted 5x (their hues drift
    otherwise: docs/tiny_base.md). Returns what each reached; the second is the VAE's."""
    first = asdict(train_vae(vae, images, steps, batch_size=8, crop=world.SIDE, seed=seed, log_every=500))
    second = asdict(train_vae(vae, images, max(4, round(steps * 3 / 8)), batch_size=8, learning_rate=5e-4, crop=world.SIDE,
                              seed=seed + 1, log_every=500, shape_weight=4.0, warmup_fraction=0.05))
    for stage in (first, second):
        stage.pop("losses")
    return second | {"seconds": first["seconds"] + second["seconds"], "steps": first["steps"] + second["steps"], "plain_stage": first}


def write_start_model(out: Path, vae: AutoencoderKL, prediction_type: str, seed: int, record: dict) -> Path:
    """The trained ``vae`` with a randomly initialised UNet and text encoder (seeded): what the
    trainer starts from. A diffusers folder, published whole, with ``record`` (what it
    was made from) in it."""
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_text_encoder(), tokenizer=clip_tokenizer(), unet=tiny_unet(),
        scheduler=tiny_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = atomic.tmp_beside(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:  # the portable tokenizer pair, as make_tiny writes it
            shutil.copy(CLIP_BPE_DIR / name, tmp / "tokenizer" / name)
        (tmp / START_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        return atomic.publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_trained_base(
    out_dir: str | Path,
    seed: int = 0,
    images: int = 2000,
    vae_steps: int = 4000,
    overrides: list[str] | None = None,
    recipe_path: str | Path = BASE_RECIPE,
    arch: str = "sd_v1",
) -> Path:
    """Generate the data, train the VAE, then the UNet and text encoder from scratch, and
    publish the diffusers folder at ``out_dir``. ``overrides`` are ``--set`` values for
    the recipe (``train.max_steps=...``). The work folder ``<out_dir>-build`` keeps the
    data, the caches, the run's report.html, previews and single file."""
    from sdtune.recipe import load_recipe
    from sdtune.train import train

    out_dir = Path(out_dir)
    if arch != "sd_v1":
        raise ValueError(f"--trained builds an SD 1.x-kind base only (got --arch {arch}); leave --arch at sd1")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder")
    if images < 8 or vae_steps < 4:
        raise ValueError(f"--images must be at least 8 and --vae-steps at least 4, got {images} and {vae_steps}")
    work = out_dir.with_name(out_dir.name + "-build")
    recipe = load_recipe(recipe_path, [f"train.seed={seed}", *(overrides or [])])  # a mistake stops before any work
    timings, started = {}, time.perf_counter()

    data = work / f"data-{images}-seed{seed}"
    if not data.exists():  # the same seed and count always write the same images
        world.write_dataset(data, world.scenes(images, seed))
    timings["data_s"] = time.perf_counter() - started

    # The starting model depends only on these; a rebuild with other UNet settings reuses it.
    start, made_from = work / "start", {"seed": seed, "images": images, "vae_steps": vae_steps,
                                        "prediction_type": recipe.model.prediction_type}
    vae_record = _reusable_start(start, made_from)
    reused = vae_record is not None
    if not reused:
        torch.manual_seed(seed)
        vae = tiny_base_vae()
        vae_record = train_base_vae(vae, load_images(data, world.SIDE), vae_steps, seed)
        shutil.rmtree(start, ignore_errors=True)
        write_start_model(start, vae, recipe.model.prediction_type, seed, made_from | {"vae": vae_record})
    else:
        print(f"sdtune: reusing the trained VAE of {start} (same seed, images and VAE steps)")
    timings["vae_s"] = vae_record["seconds"]

    recipe = load_recipe(recipe_path, [
        f"train.seed={seed}", f"model.path={start}", f"data.path={data}", f"output.dir={work}", "output.name=tiny-base",
        f"data.cache_dir={work / 'cache'}", "output.overwrite=true", "export.formats=[diffusers, single_file]",
        *(overrides or []),
    ])
    unet_started = time.perf_counter()
    result = train(recipe)
    timings["unet_s"] = time.perf_counter() - unet_started
    folder = result.output if result.output.is_dir() else result.output.with_suffix("")
    tmp = atomic.tmp_beside(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(folder, tmp)
        record = {"seed": seed, "images": images, "vae_steps": vae_steps, "unet_steps": result.steps,
                  "threads": torch.get_num_threads(), "vae": vae_record,
                  "vae_reused": reused,
                  # Each stage's time; a reused VAE's is that of the build that trained it.
                  "seconds": timings | {"total_s": sum(timings.values())}, "recipe": recipe.model_dump(mode="json")}
        (tmp / BUILD_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        atomic.publish_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"sdtune: trained base in {record['seconds']['total_s']:.0f}s on {record['threads']} thread(s) "
          f"(VAE {timings['vae_s']:.0f}s, UNet {timings['unet_s']:.0f}s); report {work / 'tiny-base.report.html'}")
    return out_dir


DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny_demo.yaml"


def trigger_lora_recipe(base: str | Path, work: str | Path, steps: int | None = None, images: int = 64, seed: int = 0,
                        overrides: list[str] | None = None):
    """The LoRA demo's recipe on a trained base: recipes/tiny_demo.yaml (its own steps unless
    ``steps`` is given) on ``world.trigger_scenes`` (written under ``work`` if missing), which
    teach the trigger word for the one shape/background pair the base never saw
    (``world.HELD_OUT``); ``overrides`` apply last."""
    from sdtune.recipe import load_recipe

    work = Path(work)
    data = work / f"trigger-{images}-seed{seed}"
    if not data.exists():
        world.write_dataset(data, world.trigger_scenes(images, seed))
    return load_recipe(DEMO_RECIPE, [
        f"model.path={base}", f"data.path={data}", f"output.dir={work}", f"output.name=tiny-base-{world.TRIGGER}",
        f"data.cache_dir={work / 'cache'}", f"train.seed={seed}",
        *([f"train.max_steps={steps}", f"preview.every_steps={max(1, steps // 3)}"] if steps else []),
        *(overrides or []),
    ])


def train_trigger_lora(base: str | Path, work: str | Path, steps: int | None = None, images: int = 64, seed: int = 0,
                       overrides: list[str] | None = None) -> Path:
    """Trains ``trigger_lora_recipe``; returns the kohya LoRA file."""
    from sdtune.train import train

    return train(trigger_lora_recipe(base, work, steps, images, seed, overrides)).output
