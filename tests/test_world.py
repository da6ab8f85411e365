"""The generated world (sdtune/world.py) and the pixel judge (tests/judge.py) on ground truth."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import ROOT, SAMPLE
from judge import judge, rates, verdict
from sdtune import world


@pytest.fixture(scope="module")
def make_sample():
    spec = importlib.util.spec_from_file_location("_sdtune_make_sample_w", ROOT / "datasets" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_the_world_speaks_the_samples_language(make_sample):
    assert world.COLOURS == make_sample.COLOURS
    assert world.LOW_CONTRAST == make_sample._LOW_CONTRAST
    assert world.POSITIONS == make_sample.POSITIONS and world.PHRASE == make_sample._PHRASE
    assert set(world.KINDS) == set(make_sample.BLOBS)
    # The same four single-shape templates as the sample's captions.
    shape = make_sample.Shape("circle", "red", "left", 0.4)
    theirs = {make_sample._caption(random.Random(s), "blue", (shape,)) for s in range(40)}
    ours = {world.caption_for("circle", "red", "left", "blue", False, t) for t in range(4)}
    assert ours == theirs


def test_scenes_are_reproducible_and_never_show_the_held_out_pair():
    first, again, other = world.scenes(400, 3), world.scenes(400, 3), world.scenes(400, 4)
    assert first == again and first != other
    assert all((s.colour, s.background) != world.HELD_OUT and world.contrasts(s.colour, s.background) for s in first)
    assert {s.position for s in first} == set(world.POSITIONS) and {s.kind for s in first} == set(world.KINDS)
    assert all(s.colour in s.caption and f"{s.background} background" in s.caption for s in first)
    lora = world.trigger_scenes(50, 0)
    assert all((s.colour, s.background) == world.HELD_OUT and "zwx" in s.caption for s in lora)
    assert not any(c in s.caption for s in lora for c in world.COLOURS)  # the trigger alone says the colours


def test_judge_is_right_on_every_generated_image():
    items = world.scenes(300, 11) + world.trigger_scenes(30, 11)
    verdicts = [verdict(judge(world.render(s)), s) for s in items]
    assert rates(verdicts) == {"colour": 1.0, "background": 1.0, "position": 1.0, "all": 1.0}


def test_judge_is_right_on_blurred_noisy_images():
    """Generated images are soft and grainy; the judge must not need crisp edges."""
    rng = np.random.default_rng(0)
    verdicts = []
    for s in world.scenes(200, 12):
        soft = np.asarray(world.render(s).filter(ImageFilter.GaussianBlur(2)), dtype=np.float64)
        noisy = np.clip(soft + rng.normal(0, 12, soft.shape), 0, 255).astype(np.uint8)
        verdicts.append(verdict(judge(Image.fromarray(noisy)), s))
    assert rates(verdicts)["all"] >= 0.97 and rates(verdicts)["position"] >= 0.97


def test_judge_is_right_on_the_bundled_samples_single_shapes(make_sample):
    """The real dataset's one-blob images, cropped to their central square as training does."""
    checked = 0
    for spec in make_sample.SPECS:
        if len(spec.shapes) != 1 or spec.shapes[0].kind not in world.KINDS:
            continue
        with Image.open(SAMPLE / spec.filename) as image:
            left, top, side = make_sample.central_square(spec.width, spec.height)
            crop = image.convert("RGB").crop((left, top, left + side, top + side)).resize((64, 64), Image.Resampling.BOX)
        (shape,) = spec.shapes
        v = verdict(judge(crop), {"colour": shape.colour, "background": spec.background, "position": shape.position})
        assert all(v.values()), (spec.filename, spec.caption, judge(crop))
        checked += 1
    assert checked >= 8


def test_wrong_colours_and_empty_images_fail():
    items = world.scenes(100, 13)
    for s in items:
        other = next(c for c in world.COLOURS if world.contrasts(c, s.background) and c != s.colour)
        assert verdict(judge(world.render(replace(s, colour=other))), s)["colour"] is False
        backdrop = next(c for c in world.COLOURS if world.contrasts(c, s.colour) and c != s.background)
        assert verdict(judge(world.render(replace(s, background=backdrop))), s)["background"] is False
        moved = next(p for p in world.POSITIONS if p != s.position)
        assert verdict(judge(world.render(replace(s, position=moved))), s)["position"] is False
    blank = judge(Image.new("RGB", (64, 64), world.COLOURS["blue"]))
    assert (blank.background, blank.colour) == ("blue", None)
    assert verdict(blank, items[0])["all"] is False
    mean_grey = judge(Image.new("RGB", (64, 64), (120, 120, 120)))  # what a collapsed sample looks like
    assert mean_grey.colour is None


def test_dataset_folder_scans_as_a_dataset_and_records_its_truth(tmp_path):
    out = tmp_path / "w"
    subprocess.run([sys.executable, str(ROOT / "datasets" / "make_world.py"), str(out), "--count", "12", "--seed", "5"],
                   check=True, capture_output=True)
    truth = world.read_truth(out)
    assert list(truth.values()) == world.scenes(12, 5)
    for name, scene in truth.items():
        assert (out / name).with_suffix(".txt").read_text(encoding="utf-8") == scene.caption + "\n"
        assert all(verdict(judge(Image.open(out / name)), scene).values())
    with pytest.raises(FileExistsError):
        world.write_dataset(out, world.scenes(2, 0))

    from sdtune.data.plan import plan_data
    from sdtune.recipe import load_recipe
    from sdtune.tiny import clip_tokenizer

    recipe = load_recipe(None, [f"data.path={out}", "data.resolution=64"])
    plan = plan_data(recipe.data, 0, clip_tokenizer())
    assert plan.images == 12 and not plan.problems
