"""The data pipeline without training: sources, the scan of bad files, buckets, captions, splits, image modes."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from sdtune.data.captions import drop_captions, shuffle_tags
from sdtune.data.images import ImageInfo, center_crop, inspect_image, load_crop
from sdtune.data.plan import BucketSpec, plan_dataset, skipped_report, warnings_for
from sdtune.data.sources import Source, find_samples
from sdtune.tiny import clip_tokenizer


def _png(path, size=(96, 64), color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _pair(folder, stem, caption, size=(96, 64), ext=".txt", color=(200, 30, 30)):
    image = _png(folder / f"{stem}.png", size, color)
    (folder / f"{stem}{ext}").write_text(caption, encoding="utf-8")
    return image


SPEC = BucketSpec(64, 16)


# Sources


def test_folder_source_reads_txt_and_caption_recursively_with_kohya_repeats(tmp_path):
    _pair(tmp_path, "a", "a red box")
    _pair(tmp_path, "b", "kohya style", ext=".caption")
    _pair(tmp_path / "10_sks dog", "c", "sks dog")
    _pair(tmp_path / "10_sks dog" / "deeper", "d", "sks dog deeper")
    _pair(tmp_path / "plain", "e", "nested")
    samples, problems = find_samples(Source(str(tmp_path), repeats=2, prefix="ohwx"), "fail")
    assert problems == []
    found = {s.name.split("/")[-1]: (s.caption, s.repeats, s.prefix) for s in samples}
    assert found == {
        "a.png": ("a red box", 2, "ohwx"),
        "b.png": ("kohya style", 2, "ohwx"),
        "c.png": ("sks dog", 20, "ohwx"),  # 10 from the folder name x 2 from the source
        "d.png": ("sks dog deeper", 20, "ohwx"),
        "e.png": ("nested", 2, "ohwx"),
    }
    assert samples[0].read() == (tmp_path / "a.png").read_bytes()


def test_metadata_jsonl_and_csv_with_a_configurable_caption_column(tmp_path):
    jsonl = tmp_path / "j"
    _png(jsonl / "x.png")
    _png(jsonl / "sub" / "y.png")
    _png(jsonl / "unlisted.png")
    rows = [{"file_name": "x.png", "text": "from jsonl"}, {"file_name": "sub/y.png", "text": "nested row"}, {"file_name": "gone.png", "text": "no file"}]
    (jsonl / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    samples, problems = find_samples(Source(str(jsonl)), "fail")
    assert {s.name.split("/")[-1]: s.caption for s in samples} == {"x.png": "from jsonl", "y.png": "nested row"}
    assert {(p.name.split("/")[-1], p.kind) for p in problems} == {("gone.png", "orphan_caption"), ("unlisted.png", "no_caption")}

    csv_dir = tmp_path / "c"
    _png(csv_dir / "x.png")
    (csv_dir / "metadata.csv").write_text('file_name,prompt\nx.png,"a red box, studio"\n', encoding="utf-8")
    samples, _ = find_samples(Source(str(csv_dir), caption_column="prompt"), "fail")
    assert [s.caption for s in samples] == ["a red box, studio"]
    with pytest.raises(ValueError, match="no 'text' column .*set caption_column"):
        find_samples(Source(str(csv_dir)), "fail")


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    files = [_png(tmp_path / "src" / f"{i}.png", (64 + 16 * i, 64), (10 * i, 0, 0)) for i in range(3)]
    table = datasets.Dataset.from_dict({"image": [str(f) for f in files], "caption": ["zero", "one", "two"]})
    table = table.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    originals = [f.read_bytes() for f in files]
    for f in files:
        f.unlink()  # the saved dataset carries the image bytes itself
    samples, problems = find_samples(Source(str(tmp_path / "saved"), caption_column="caption"), "fail")
    assert problems == []
    assert [s.caption for s in samples] == ["zero", "one", "two"]
    assert [s.read() for s in samples] == originals
    with pytest.raises(ValueError, match="splits \\['train'\\], not 'test'"):
        find_samples(Source(str(tmp_path / "saved"), split="test"), "fail")
    plan = plan_dataset([Source(str(tmp_path / "saved"), caption_column="caption")], SPEC)
    assert plan.images == 3


def test_several_sources_with_repeats_and_a_prefix(tmp_path):
    for i in range(3):
        _pair(tmp_path / "people", f"p{i}", "a person, smiling")
    for i in range(2):
        _pair(tmp_path / "styles", f"s{i}", "a painting")
    plan = plan_dataset(
        [Source(str(tmp_path / "people"), repeats=3, prefix="ohwx"), Source(str(tmp_path / "styles"))], SPEC
    )
    assert plan.images == 5 and len(plan.train) == 3 * 3 + 2
    assert sorted({i.caption for i in plan.train}) == ["a painting", "ohwx, a person, smiling"]


# Buckets


@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (64, 16), (1024, 32)])
def test_buckets_have_the_area_step_and_ratio_asked_for(resolution, step):
    buckets = make_buckets(resolution, step, resolution // 2, resolution * 2, 2.0)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution**2
        # As large as the step allows: one more step on the long side would pass the area.
        assert (max(w, h) + step) * min(w, h) > resolution**2
        assert max(w, h) / min(w, h) <= 2.0 and min(w, h) >= resolution // 2
        assert (h, w) in buckets
    assert make_buckets(512, 64, 256, 1024, 1.0) == [(512, 512)]
    with pytest.raises(ValueError, match="not a multiple of the bucket step"):
        make_buckets(72, 64, 32, 144, 2.0)


def test_nearest_bucket_is_by_aspect_ratio():
    buckets = make_buckets(512, 64, 256, 1024, 2.0)
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)
    assert nearest_bucket(1080, 1920, buckets) == (384, 640)
    assert nearest_bucket(1000, 1010, buckets) == (512, 512)
    assert nearest_bucket(4000, 3000, buckets) == (576, 448)


def test_every_image_lands_in_exactly_one_bucket_and_batches_never_mix(tmp_path):
    rng = random.Random(0)
    for i in range(30):
        _pair(tmp_path, f"{i:02d}", f"caption {i}", (rng.randrange(64, 200), rng.randrange(64, 200)))
    plan = plan_dataset([Source(str(tmp_path))], SPEC, flip=True)
    assert plan.images == 30 and len(plan.train) == 60
    per_image: dict[str, set] = {}
    for item in plan.train:
        assert item.crop.bucket in plan.buckets
        per_image.setdefault(item.sample.name, set()).add(item.crop.bucket)
    assert len(per_image) == 30 and all(len(b) == 1 for b in per_image.values())
    assert len({item.crop.bucket for item in plan.train}) == 3  # the sizes span the buckets

    buckets = [item.crop.bucket for item in plan.train]
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=7)
    epoch0 = list(sampler)
    sampler.start(1)
    epoch1 = list(sampler)
    for epoch in (epoch0, epoch1):
        indices = [i for batch in epoch for i, _ in batch]
        assert sorted(indices) == list(range(60))  # each item once per epoch; nothing dropped
        assert all(len({buckets[i] for i, _ in batch}) == 1 for batch in epoch)
        assert len(epoch) == len(sampler)
    assert epoch0 != epoch1 and {e for batch in epoch1 for _, e in batch} == {1}
    assert list(BucketBatchSampler(buckets, 4, seed=7)) == epoch0  # determined by the seed
    assert list(BucketBatchSampler(buckets, 4, seed=8)) != epoch0
    sampler.start(1, skip=2)  # a resumed run picks the epoch up after its first two batches
    assert list(sampler) == epoch1[2:]
    # Several processes get whole batches, as many as each other, and between them the
    # whole epoch in its order: batch k of rank r is the epoch's batch k * world + r.
    # When the batches do not divide, the short processes repeat the epoch's first ones.
    for world in (2, 3, 5):
        samplers = [BucketBatchSampler(buckets, 4, seed=7, rank=rank, world=world) for rank in range(world)]
        shards = [list(s) for s in samplers]
        assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) == len(samplers[0]) == -(-len(epoch0) // world)
        by_place = {s.global_index(k): batch for s, shard in zip(samplers, shards) for k, batch in enumerate(shard)}
        assert [by_place[i] for i in range(len(epoch0))] == epoch0  # every batch, in order, none dropped
        extra = sorted(by_place)[len(epoch0):]
        assert [by_place[i] for i in extra] == epoch0[: len(extra)] and len(extra) == (-len(epoch0)) % world
    assert len(epoch0) % 3 and len(epoch0) % 5  # (so worlds 3 and 5 above needed topping up)
    # Bucket assignment and crops are the same on a second scan.
    again = plan_dataset([Source(str(tmp_path))], SPEC, flip=True)
    assert [(i.sample.name, i.crop) for i in again.train] == [(i.sample.name, i.crop) for i in plan.train]


def test_crops_are_recorded_center_or_random_by_seed(tmp_path):
    _pair(tmp_path, "wide", "wide", (200, 64))
    center = plan_dataset([Source(str(tmp_path))], SPEC).train[0].crop
    assert center.bucket == (80, 48) and center.resized == (150, 48)  # scaled to just cover the bucket
    assert (center.left, center.top) == (35, 0)
    randoms = {seed: plan_dataset([Source(str(tmp_path))], SPEC, crop="random", seed=seed).train[0].crop for seed in range(5)}
    assert randoms[1] == plan_dataset([Source(str(tmp_path))], SPEC, crop="random", seed=1).train[0].crop
    assert len({c.left for c in randoms.values()}) > 1
    assert all(0 <= c.left <= 150 - 80 and c.top == 0 for c in randoms.values())


# Bad input


def _bad_folder(root):
    """One file of every kind the scan must report, plus two good pairs."""
    _pair(root, "good1", "fine", color=(0, 90, 0))
    _pair(root, "good2", "fine too", color=(0, 0, 90))
    (root / "zero.png").write_bytes(b"")
    (root / "zero.txt").write_text("zero")
    (root / "notimage.jpg").write_text("this is text, not a jpeg")
    (root / "notimage.txt").write_text("x")
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buffer, "PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "truncated.txt").write_text("x")
    _png(root / "nocaption.png")
    (root / "orphan.txt").write_text("caption of a deleted image")
    _pair(root, "small", "tiny", (32, 32))
    _pair(root, "banner", "very wide", (1000, 100))
    _png(root / "latin1.png")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def test_the_scan_reports_every_bad_file_by_name_before_any_work(tmp_path):
    folder = _bad_folder(tmp_path / "bad")
    with pytest.raises(ValueError) as info:
        plan_dataset([Source(str(folder))], SPEC)
    message = str(info.value)
    for name, kind in [
        ("zero.png", "zero-byte"), ("notimage.jpg", "not images"), ("truncated.png", "truncated"),
        ("nocaption.png", "no caption file"), ("small.png", "upscaled"), ("banner.png", "extreme aspect"),
        ("latin1.txt", "not valid UTF-8"),
    ]:
        assert name in message and kind in message, (name, message)
    assert "set data.on_bad_image: skip" in message and "data.missing_caption" in message
    assert "good1" not in message


def test_skip_trains_on_the_rest_and_lists_what_it_skipped(tmp_path):
    folder = _bad_folder(tmp_path / "bad")
    plan = plan_dataset([Source(str(folder))], SPEC, on_bad_image="skip", missing_caption="filename")
    assert sorted(i.sample.name.split("/")[-1] for i in plan.train) == ["good1.png", "good2.png", "nocaption.png"]
    assert [i.caption for i in plan.train if "nocaption" in i.sample.name] == ["nocaption"]
    kinds = {p.name.split("/")[-1]: p.kind for p in plan.skipped}
    assert kinds == {
        "zero.png": "empty", "notimage.jpg": "not_image", "truncated.png": "unreadable", "small.png": "too_small",
        "banner.png": "extreme_aspect", "latin1.txt": "caption_encoding",
    }
    report = skipped_report(plan)
    assert len(report.splitlines()) == 6 and "truncated.png\tunreadable\t" in report
    lines = warnings_for(plan)
    assert any("skipping 6 bad image(s)" in line for line in lines)
    assert any("orphan.txt" in line for line in lines)  # reported, never silently ignored
    empty = plan_dataset([Source(str(folder))], SPEC, on_bad_image="skip", missing_caption="empty")
    assert [i.caption for i in empty.train if "nocaption" in i.sample.name] == [""]


def test_inspect_image_detects_each_kind():
    assert inspect_image(b"") == ("empty", "0 bytes")
    assert inspect_image(b"GIF89a nonsense")[0] in ("not_image", "unreadable")
    buffer = io.BytesIO()
    Image.new("RGB", (50, 30)).save(buffer, "JPEG")
    assert inspect_image(buffer.getvalue()) == ImageInfo(50, 30)
    assert inspect_image(buffer.getvalue()[:-200])[0] == "unreadable"


# Image modes


def _encode(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _pixels(data):
    info = inspect_image(data)
    return load_crop(data, center_crop(info, (info.width, info.height)))


def test_modes_become_the_right_rgb():
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    white = torch.ones(3, 1, 1)
    # RGBA: transparent pixels on white, opaque ones as they are.
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    pixels = _pixels(_encode(rgba))
    assert torch.allclose(pixels[:, :, :4], red.expand(3, 8, 4)) and torch.allclose(pixels[:, :, 4:], white.expand(3, 8, 4))
    # Palette with a transparent index, and LA.
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 2, 4))
    pixels = _pixels(_encode(palette, transparency=0))
    assert torch.allclose(pixels[:, :, :2], red.expand(3, 4, 2)) and torch.allclose(pixels[:, :, 2:], white.expand(3, 4, 2))
    assert torch.allclose(_pixels(_encode(Image.new("LA", (4, 4), (0, 0)))), white.expand(3, 4, 4))
    # 16-bit grayscale: mid-gray stays mid-gray (PIL's own convert makes it white).
    gray16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert gray16.mode.startswith("I")
    assert torch.allclose(_pixels(_encode(gray16)), torch.zeros(3, 4, 4), atol=0.01)
    # L and CMYK.
    assert torch.allclose(_pixels(_encode(Image.new("L", (4, 4), 255))), white.expand(3, 4, 4))
    cmyk = _pixels(_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100))
    assert cmyk[0].mean() > 0.9 and cmyk[1].mean() < -0.8 and cmyk[2].mean() < -0.8  # red


def test_exif_orientation_and_flip():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = _encode(image, "JPEG", exif=exif.tobytes(), quality=100)
    info = inspect_image(data)
    assert info == ImageInfo(20, 40)  # displayed portrait
    upright = load_crop(data, center_crop(info, (16, 32)))
    assert upright.shape == (3, 32, 16)
    assert upright[0, :6].mean() > 0.8 and upright[0, -6:].mean() < -0.8  # the red band is now on top
    mirrored = load_crop(data, center_crop(info, (16, 32), flip=True))
    torch.testing.assert_close(mirrored, upright.flip(-1))


# Captions


def test_tag_shuffling_keeps_the_first_tags_and_the_prefix():
    caption = "1girl, solo, red hair, smile, outdoors, looking at viewer"
    orders = {shuffle_tags(caption, 2, random.Random(seed), prefix="ohwx") for seed in range(30)}
    assert len(orders) > 10
    for order in orders:
        tags = order.split(", ")
        assert tags[:3] == ["ohwx", "1girl", "solo"]
        assert sorted(tags[3:]) == sorted(["red hair", "smile", "outdoors", "looking at viewer"])
    assert shuffle_tags("a photo of a cat", 0, random.Random(0)) == "a photo of a cat"
    # The order comes from the generator it is given, not from the global one.
    random.seed(1)
    first = shuffle_tags(caption, 1, random.Random(3))
    random.seed(2)
    assert shuffle_tags(caption, 1, random.Random(3)) == first


def test_caption_dropout_replaces_that_fraction_with_the_empty_caption():
    conditioning = torch.ones(4000, 77, 8)
    empty = torch.zeros(77, 8)
    dropped = drop_captions(conditioning, empty, 0.25, generator=torch.Generator().manual_seed(0))
    fraction = (dropped[:, 0, 0] == 0).float().mean().item()
    assert 0.22 < fraction < 0.28
    assert torch.equal(drop_captions(conditioning, empty, 0.0), conditioning)


def test_long_captions_are_counted_once(tmp_path):
    _pair(tmp_path, "short", "a cat")
    for i in range(3):
        _pair(tmp_path, f"long{i}", ", ".join(f"tag number {n}" for n in range(60)))
    plan = plan_dataset([Source(str(tmp_path))], SPEC, tokenizer=clip_tokenizer())
    assert len(plan.truncated) == 3
    lines = [line for line in warnings_for(plan) if "tokens" in line]
    assert len(lines) == 1 and lines[0].startswith("3 caption(s) are longer than 77 tokens")


# Validation split


def test_validation_split_is_fixed_by_its_seed(tmp_path):
    for i in range(20):
        _pair(tmp_path, f"{i:02d}", f"c{i}")
    source = [Source(str(tmp_path))]

    def held(**kwargs):
        return sorted(i.sample.name for i in plan_dataset(source, SPEC, **kwargs).validation)

    assert len(held(validation_split=0.2)) == 4 and len(held(validation_split=3)) == 3
    assert held(validation_split=0.2) == held(validation_split=0.2, seed=99)  # train.seed does not move it
    assert held(validation_split=0.2, split_seed=1) != held(validation_split=0.2)
    plan = plan_dataset(source, SPEC, validation_split=5, flip=True)
    assert not {i.sample.name for i in plan.validation} & {i.sample.name for i in plan.train}
    assert plan.images == 15 and len(plan.train) == 30
    with pytest.raises(ValueError, match="leaving none to train on"):
        plan_dataset(source, SPEC, validation_split=20)
