"""Masked loss (data.masks): the loss formula, masks at latent resolution with the image's
geometry, their cache keys, the scan's checks, and training with them."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdtune.data.cache import cache_masks
from sdtune.data.masks import latent_mask
from sdtune.data.plan import BucketSpec, plan_dataset, summary
from sdtune.data.sources import Source
from sdtune.diffusion import diffusion_loss
from sdtune.errors import DataError
from sdtune.train import main

from conftest import ROOT, SAMPLE
from test_data_pipeline import _args

SPEC = BucketSpec(64, 16)


def _half_mask(path, size, keep="right", level=255):
    """A mask of ``size`` that is black on the left half (``level``, white by default, on the right), or the reverse."""
    mask = Image.new("L", size, 0 if keep == "right" else level)
    mask.paste(level if keep == "right" else 0, (size[0] // 2, 0, size[0], size[1]))
    mask.save(path)


def _images(folder, count, size=(64, 64)):
    folder.mkdir(parents=True)
    for image in sorted(p for p in SAMPLE.iterdir() if p.suffix == ".png")[:count]:
        with Image.open(image) as im:
            im.convert("RGB").resize(size).save(folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return folder


def test_masked_loss_is_the_masked_mean_and_masked_out_elements_get_exactly_zero_gradient():
    torch.manual_seed(0)
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :3] = 0.0  # the left 3 columns do not count
    mask[1, :, :, 3] = 0.5  # a partly covered column counts half
    loss = diffusion_loss(prediction, target, mask=mask)
    squared = (prediction - target).pow(2)
    expected = torch.stack([(squared[i] * mask[i]).sum() / (mask[i].sum() * 4) for i in range(2)]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    loss.backward()
    assert (prediction.grad[:, :, :, :3] == 0).all()  # exactly zero, not small
    assert (prediction.grad[:, :, :, 4:] != 0).all()
    # Per-sample weights (min-SNR) compose with it; an all-ones mask is the plain mean.
    weights = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(diffusion_loss(prediction, target, weights, mask=mask),
                               (weights * torch.stack([(squared[i] * mask[i]).sum() / (mask[i].sum() * 4) for i in range(2)])).mean())
    assert diffusion_loss(prediction, target, weights, mask=torch.ones(2, 1, 8, 8)) == diffusion_loss(prediction, target, weights)
    assert diffusion_loss(prediction, target, mask=torch.zeros(2, 1, 8, 8)) == 0  # nothing counts: no 0/0


def test_masks_follow_the_images_resize_cut_and_mirror_onto_the_latent_grid(tmp_path):
    data = _images(tmp_path / "data", 1, size=(96, 64))  # wide: resized to cover its bucket and cut
    image = next(data.glob("*.png"))
    _half_mask(data / f"{image.stem}_mask.png", (48, 32))  # half the image's size, its shape: resized to it
    plan = plan_dataset([Source(str(data))], SPEC, flip=True, masks="files")
    assert [i.sample.name for i in plan.train] == [str(image)] * 2  # the mask file is not a training image
    plain, mirrored = (latent_mask(item, "files", 8, (data / f"{image.stem}_mask.png").read_bytes()) for item in plan.train)
    crop = plan.train[0].crop
    assert plain.shape == (1, crop.bucket[1] // 8, crop.bucket[0] // 8)
    # The mask's black half is the image's left half, wherever the crop cut it.
    columns = plain[0].mean(0)
    boundary = (crop.resized[0] / 2 - crop.left) / 8  # the half-way line, in latent cells of the cut
    assert (columns[: int(boundary)] < 0.05).all() and (columns[int(boundary) + 1 :] > 0.95).all()
    torch.testing.assert_close(mirrored, plain.flip(-1))
    # The image's alpha channel: transparent pixels do not count; an image without alpha is all ones.
    (data / f"{image.stem}_mask.png").unlink()
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))
    rgba.save(data / image.name)
    item = plan_dataset([Source(str(data))], SPEC, masks="alpha").train[0]
    alpha = latent_mask(item, "alpha", 8)
    assert (alpha[0, :, :4] == 0).all() and (alpha[0, :, 4:] == 1).all()
    Image.new("RGB", (64, 64)).save(data / image.name)
    item = plan_dataset([Source(str(data))], SPEC, masks="alpha").train[0]
    assert (latent_mask(item, "alpha", 8) == 1).all()


def test_mask_entries_are_cached_and_a_changed_mask_file_gets_a_new_entry(tiny_v, tmp_path):
    data = _images(tmp_path / "data", 3)
    for i, image in enumerate(sorted(data.glob("*.png"))):
        _half_mask(data / f"{image.stem}_mask.png", (64, 64), level=255 - i)  # three masks: three entries
    scale = 2 ** (len(AutoencoderKL.load_config(tiny_v, subfolder="vae")["block_out_channels"]) - 1)
    plan = plan_dataset([Source(str(data))], SPEC, masks="files")
    assert "loss masks: <stem>_mask.png files" in summary(plan)
    shards = [cache_masks(plan.train, "files", scale, tmp_path / "shards", shard=(rank, 2), show_progress=False) for rank in (0, 1)]
    assert [stats.encoded for _, stats in shards] == [2, 1] and shards[0][0] == shards[1][0]  # each entry made by one process
    paths, first = cache_masks(plan.train, "files", scale, tmp_path / "cache", show_progress=False)
    assert (first.encoded, first.reused) == (3, 0) and len(set(paths)) == 3
    assert paths == [tmp_path / "cache" / p.relative_to(tmp_path / "shards") for p in shards[0][0]]  # the same keys
    again_paths, again = cache_masks(plan.train, "files", scale, tmp_path / "cache", show_progress=False)
    assert (again.encoded, again.reused) == (0, 3) and again_paths == paths
    changed = sorted(data.glob("*_mask.png"))[1]
    _half_mask(changed, (64, 64), keep="left")
    after_paths, after = cache_masks(plan.train, "files", scale, tmp_path / "cache", show_progress=False)
    assert (after.encoded, after.reused) == (1, 2) and after_paths[1] != paths[1] and after_paths[0] == paths[0]


def test_a_missing_misshapen_or_broken_mask_is_reported_or_skipped_by_on_bad_image(tmp_path):
    data = _images(tmp_path / "data", 4)
    images = sorted(data.glob("*.png"))
    _half_mask(data / f"{images[0].stem}_mask.png", (64, 64))
    _half_mask(data / f"{images[1].stem}_mask.png", (64, 32))  # another shape
    _half_mask(data / f"{images[2].stem}_mask.png", (64, 64))
    broken = (data / f"{images[2].stem}_mask.png").read_bytes()
    (data / f"{images[2].stem}_mask.png").write_bytes(broken[: len(broken) // 2])  # truncated: fails only when decoded
    with pytest.raises(DataError) as info:
        plan_dataset([Source(str(data))], SPEC, masks="files")
    message = str(info.value)
    assert "images without a loss mask" in message and f"{images[3]}  (no {images[3].stem}_mask.png)" in message
    assert f"{images[1].stem}_mask.png is 64x32, the image 64x64: another shape" in message
    assert f"{images[2].stem}_mask.png cannot be read" in message
    assert "data.on_bad_image: skip" in message
    plan = plan_dataset([Source(str(data))], SPEC, masks="files", on_bad_image="skip")
    assert [i.sample.name for i in plan.train] == [str(images[0])]
    assert sorted(p.kind for p in plan.skipped) == ["bad_mask", "bad_mask", "no_mask"]


def _masked_run(model, tmp_path, name, *extra):
    return main(_args(model, tmp_path, "data.num_workers=0", "train.batch_size=2", "train.max_steps=3", "train.log_every=1",
                      f"output.name={name}", *extra))


def test_training_with_all_ones_masks_equals_training_without_and_masks_change_the_loss(tiny_v, tmp_path):
    data = _images(tmp_path / "data", 4)
    plain = _masked_run(tiny_v, tmp_path, "plain", f"data.path={data}")
    for image in list(data.glob("*.png")):
        Image.new("L", (64, 64), 255).save(data / f"{image.stem}_mask.png")
    ones = _masked_run(tiny_v, tmp_path, "ones", f"data.path={data}", "data.masks=files")
    torch.testing.assert_close(torch.tensor(ones.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    for image in list(data.glob("*_mask.png")):
        _half_mask(image, (64, 64))
    half = _masked_run(tiny_v, tmp_path, "half", f"data.path={data}", "data.masks=files")
    assert half.losses[0] != pytest.approx(plain.losses[0], rel=1e-3)


def test_the_masked_lora_recipe_runs_with_masks_beside_the_images(tiny_eps, tmp_path):
    """recipes/masked_lora.yaml as shipped but for where things are and how long it runs (64 px: the tiny model)."""
    from sdtune.recipe import load_recipe
    from sdtune.train import train

    data = _images(tmp_path / "data", 2)
    for i, image in enumerate(sorted(data.glob("*.png"))):
        _half_mask(data / f"{image.stem}_mask.png", (64, 64), level=255 - i)
    recipe = load_recipe(ROOT / "recipes" / "masked_lora.yaml", [
        f"model.path={tiny_eps}", f"data.path={data}", "data.resolution=64", f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=2", "train.batch_size=1", "train.mixed_precision=no", "train.gradient_checkpointing=false",
        f"output.dir={tmp_path / 'out'}",
    ])
    assert recipe.data.masks == "files"
    result = train(recipe)
    assert result.steps == 2 and result.output.is_file()
    assert len(list((tmp_path / "cache" / "masks").rglob("*.safetensors"))) == 2


def test_class_images_without_mask_files_train_unmasked(tmp_path):
    subject = _images(tmp_path / "subject", 1)
    cls = _images(tmp_path / "class", 2)
    _half_mask(subject / f"{next(subject.glob('*.png')).stem}_mask.png", (64, 64))
    plan = plan_dataset([Source(str(subject)), Source(str(cls), class_images=True)], SPEC, masks="files")
    instance, prior = plan.train
    assert prior.sample.is_class and not plan.problems
    paths, _ = cache_masks(plan.train, "files", 8, tmp_path / "cache", show_progress=False)
    from sdtune.data.cache import read_entry

    assert (read_entry(paths[1])["mask"] == 1).all() and (read_entry(paths[0])["mask"][0, :, :4] == 0).all()
    (next(subject.glob("*_mask.png"))).unlink()
    with pytest.raises(DataError, match="images without a loss mask"):  # an instance image still needs its mask
        plan_dataset([Source(str(subject)), Source(str(cls), class_images=True)], SPEC, masks="files")
