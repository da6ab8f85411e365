"""The data pipeline with the tiny model: the latent cache, training on buckets, `sdtune data` and `sdtune cache`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from sdtune.data.cache import cache_latents, latent_key
from sdtune.data.class_images import generate_class_images
from sdtune.data.images import load_crop
from sdtune.data.plan import BucketSpec, plan_dataset
from sdtune.data.sources import Source
from sdtune.cli import main as cli_main
from sdtune.recipe import load_recipe
from sdtune.train import main

from conftest import ROOT, SAMPLE, cpu_processes
from test_data import _bad_folder, _pair

SPEC = BucketSpec(64, 16)


def _sample_copy(folder, count):
    folder.mkdir(parents=True)
    for image in sorted(p for p in SAMPLE.iterdir() if p.suffix != ".txt")[:count]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return folder


def test_cache_hits_on_a_second_pass_and_reencodes_exactly_the_changed_image(tiny_v, tmp_path):
    data = _sample_copy(tmp_path / "data", 10)
    vae = AutoencoderKL.from_pretrained(tiny_v, subfolder="vae")
    cache = tmp_path / "cache"

    def run(**kwargs):
        plan = plan_dataset([Source(str(data))], SPEC, **kwargs)
        return plan, *cache_latents(plan.train, vae, "vae-a", cache, torch.device("cpu"), show_progress=False)

    plan, paths, first = run(flip=True)
    assert (first.encoded, first.reused, first.invalidated) == (20, 0, 0)  # 10 images, each also mirrored
    entry = load_file(paths[0])
    assert set(entry) == {"mean", "std"} and entry["mean"].shape[1:] == (plan.train[0].crop.bucket[1] // 8, plan.train[0].crop.bucket[0] // 8)
    assert (entry["std"] > 0).all()

    _, again_paths, again = run(flip=True)
    assert (again.encoded, again.reused, again.invalidated) == (0, 20, 0) and again_paths == paths

    changed = sorted(data.glob("*.png"))[3]
    with Image.open(changed) as image:
        image.rotate(180).save(changed)
    _, _, after = run(flip=True)
    assert (after.encoded, after.reused, after.invalidated) == (2, 18, 2)  # the image and its mirror

    # A flipped view is its own entry, made from mirrored pixels.
    plain, mirrored = plan.train[0], plan.train[1]
    assert mirrored.crop.flip and not plain.crop.flip and latent_key(plain, "vae-a") != latent_key(mirrored, "vae-a")
    data_bytes = plain.sample.read()
    torch.testing.assert_close(load_crop(data_bytes, mirrored.crop), load_crop(data_bytes, plain.crop).flip(-1))

    # Another VAE or another crop is another key; the same recipe over the same bytes is not.
    _, other_vae = cache_latents(plan.train[:2], vae, "vae-b", cache, torch.device("cpu"), show_progress=False)
    assert other_vae.encoded == 2
    _, _, random_crop = run(flip=True, crop="random", seed=3)
    assert 0 < random_crop.encoded < 20  # only images with room to move get a new crop


def _args(model, tmp_path, *extra):
    return [
        "--recipe", "recipes/tiny_demo.yaml",
        "--set", f"model.path={model}",
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", f"output.dir={tmp_path / 'out'}",
        "--set", "train.logger=none",
        "--set", "preview.prompts=[]",  # the demo's previews and held-out images are not what these tests are about
        "--set", "data.validation_split=0",
        *[item for pair in (("--set", e) for e in extra) for item in pair],
    ]


def test_training_on_buckets_with_every_data_option(tiny_v, tmp_path):
    """Several sources, bad files skipped, buckets of three shapes, flips, shuffled tags:
    the default collate would fail on a batch that mixed bucket sizes."""
    _sample_copy(tmp_path / "folder" / "3_shapes", 6)
    bad = _bad_folder(tmp_path / "bad")
    meta = tmp_path / "meta"
    _pair(meta, "m0", "unused", (64, 112))
    (meta / "m0.txt").unlink()
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "m0.png", "tags": "tall, green"}) + "\n")
    sources = json.dumps([
        {"path": str(tmp_path / "folder"), "prefix": "ohwx"},
        {"path": str(bad)},
        {"path": str(meta), "caption_column": "tags", "repeats": 2},
    ])
    result = main(_args(
        tiny_v, tmp_path, f"data.sources={sources}", "data.path=null", "data.bucket_step=16", "data.flip=true",
        "data.shuffle_tags=true", "data.keep_tokens=1", "data.on_bad_image=skip", "data.missing_caption=empty",
        "data.validation_split=1", "train.batch_size=4", "train.max_steps=4", "data.num_workers=0",
    ))
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.text_cache is None  # shuffled tags: the text encoder runs in the loop
    # 6 + 3 good (good1, good2, nocaption) + 1 = 10 images, 1 held out; all cached, mirrored too.
    assert result.latent_cache.encoded == 2 * 9 + 1
    skipped = (tmp_path / "out" / "tiny-demo.skipped.tsv").read_text().splitlines()
    assert len(skipped) == 6 and any(line.startswith(str(bad / "truncated.png")) for line in skipped)


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def test_sdtune_data_prints_the_summary_and_bucket_histogram(tmp_path, capsys):
    run = _cli("data", str(SAMPLE), "--set", "data.resolution=64", "--set", "data.bucket_step=16")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "images: 40 trained, 0 held out for validation, 0 skipped" in run.stdout
    assert "   48 x 80 " in run.stdout and "   80 x 48 " in run.stdout and "#" in run.stdout

    bad = _bad_folder(tmp_path / "bad")
    code = cli_main(["data", str(bad), "--set", "data.resolution=64", "--set", "data.bucket_step=16", "--set", "data.missing_caption=empty"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "images: 3 trained" in out and "truncated.png" in out  # the summary, with the problems
    assert "a run with these settings would stop: 6 bad image(s)" in err and "data.on_bad_image: skip" in err

    # Without a caption policy, the missing caption and the bad files are all named in one pass.
    code = cli_main(["data", str(bad), "--set", "data.resolution=64", "--set", "data.bucket_step=16"])
    out, err = capsys.readouterr()
    assert code == 2 and "truncated.png" in out and "nocaption.png" in out
    assert "1 image(s) have no caption" in err and "6 bad image(s)" in err


def test_sdtune_cache_builds_ahead_and_training_then_encodes_nothing(tiny_v, small_dataset, tmp_path, capsys):
    # In-process; the test below runs it as a command, under accelerate launch.
    args = ["cache", *_args(tiny_v, tmp_path, f"data.path={small_dataset}", "data.bucket_step=16")]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    assert "latent cache 8 encoded, 0 reused, 0 invalidated" in out
    assert "caching latents: 100%" in err and "img/s" in err  # progress with rate and ETA
    assert cli_main(args) == 0
    out, _ = capsys.readouterr()
    assert "latent cache 0 encoded, 8 reused" in out and "text cache 0 encoded, 9 reused" in out
    result = main(args[1:] + ["--set", "train.max_steps=1"])
    assert result.latent_cache.encoded == 0 and result.text_cache.encoded == 0


@pytest.mark.skipif(not shutil.which("accelerate", path=os.path.dirname(sys.executable)), reason="accelerate CLI not installed")
def test_sdtune_cache_under_accelerate_launch_splits_the_work(tiny_v, small_dataset, tmp_path):
    # With DreamBooth class images to draw first: 6 of them, in batches of 4 (class_images.BATCH),
    # so one process draws 4 and the other 2.
    classes = tmp_path / "class"
    sources = f"data.sources=[{{path: {small_dataset}}}, {{path: {classes}, class_images: true, class_prompt: a red circle, num_class_images: 6}}]"
    args = _args(tiny_v, tmp_path, "data.path=null", sources, "data.bucket_step=16")[2:]
    # The one invocation that gives two CPU processes (gloo): `--cpu --num_processes 2`
    # runs one, and `--multi_gpu` alone runs two that do not know of each other.
    command, env = cpu_processes(2, "-m", "sdtune", "cache", "--recipe", "recipes/tiny_demo.yaml", *args)
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("sdtune: drew 6 class image(s) of 'a red circle'") == 1, run.stdout
    # The main process drew its share (its progress bar counts 4), the other the rest.
    assert re.search(r"class images for \S+: 100%\S* 4/4 ", run.stderr) and " 6/6 " not in run.stderr, run.stderr[-3000:]
    # The same files as one process draws: each image in the same batch with the same seed.
    alone = tmp_path / "alone"
    assert generate_class_images(alone, "a red circle", 6, 64, load_recipe(ROOT / "recipes" / "tiny_demo.yaml").train.seed,
                                 str(tiny_v), False) == 6
    drawn = sorted(p.name for p in classes.iterdir())
    assert drawn == sorted(p.name for p in alone.iterdir()) and len(drawn) == 12  # 6 images, 6 captions
    assert all((classes / name).read_bytes() == (alone / name).read_bytes() for name in drawn)
    # Each process encoded its half of the 14 images; the totals are reported once.
    assert run.stdout.count("latent cache 14 encoded (7 + 7 by 2 processes), 0 reused") == 1, run.stdout
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 14
