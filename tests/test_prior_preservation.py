"""DreamBooth prior preservation: class images in the epoch, their loss weight from the
cached dataset to the loss, class images drawn with the base model, and the recipe."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from PIL import Image

from sdtune.data.class_images import fill_class_folders, generate_class_images
from sdtune.data.plan import BucketSpec, plan_dataset, summary
from sdtune.data.sources import Source
from sdtune.diffusion import Objective, diffusion_loss
from sdtune.errors import DataError
from sdtune.loop import StepSetup, batch_loss
from sdtune.recipe import RecipeError, load_recipe, recipe_from_dict
from sdtune.train import main, train

from conftest import ROOT, SAMPLE
from test_data_pipeline import _args

SPEC = BucketSpec(64, 16)


def _copy(folder, images, caption=None):
    folder.mkdir(parents=True)
    for image in images:
        shutil.copy(image, folder / image.name)
        (folder / f"{image.stem}.txt").write_text(caption or image.with_suffix(".txt").read_text())
    return folder


def _instance_and_class(tmp_path, instances=3, classes=5):
    pngs = sorted(p for p in SAMPLE.iterdir() if p.suffix == ".png")
    return (_copy(tmp_path / "subject", pngs[:instances]),
            _copy(tmp_path / "class", pngs[instances : instances + classes], "a shape"))


def test_the_prior_term_is_the_class_samples_loss_times_its_own_weight():
    torch.manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))  # samples 0, 1 instance; 2, 3 class
    for w in (0.0, 0.5, 1.0, 3.0):
        loss = diffusion_loss(prediction, target, sample_weights=torch.tensor([1.0, 1.0, w, w]))
        torch.testing.assert_close(loss, (per_sample[:2].sum() + w * per_sample[2:].sum()) / 4)
    # Min-SNR weights multiply it.
    snr_w = torch.tensor([0.2, 0.4, 0.6, 0.8])
    torch.testing.assert_close(diffusion_loss(prediction, target, snr_w, sample_weights=torch.tensor([1.0, 1.0, 2.0, 2.0])),
                               (snr_w * per_sample * torch.tensor([1.0, 1.0, 2.0, 2.0])).mean())


def test_batch_loss_takes_each_samples_weight_from_the_batch():
    """Through loop.batch_loss (what train() calls), with min-SNR on: the loss is linear in
    the class samples' weight, and changing it changes exactly the class part."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    setup = StepSetup(scheduler, Objective(min_snr_gamma=5.0), 0.18215, 0, 1000, "uniform", 0.0, 1.0, 0.0, False, 0.0,
                      {"encoder_hidden_states": torch.zeros(77, 32)}, 0.0)
    unet = lambda noisy, t, cond, return_dict=False: (0.5 * noisy,)  # noqa: E731  (any fixed prediction)
    batch = {"mean": torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), "std": torch.full((4, 4, 8, 8), 0.1),
             "encoder_hidden_states": torch.randn(4, 77, 32)}

    def loss(weights):
        extra = {} if weights is None else {"loss_weight": torch.tensor(weights)}
        return batch_loss(unet, None, batch | extra, setup, False, torch.Generator().manual_seed(7))

    instance, prior = loss([1.0, 1.0, 0.0, 0.0]), loss([0.0, 0.0, 1.0, 1.0])
    assert instance > 0 and prior > 0
    for w in (0.5, 2.0):
        torch.testing.assert_close(loss([1.0, 1.0, w, w]), instance + w * prior)
    assert loss([1.0, 1.0, 1.0, 1.0]) == loss(None)


def test_an_epoch_holds_as_many_class_items_as_instance_items_and_none_is_held_out(tmp_path):
    subject, cls = _instance_and_class(tmp_path, instances=3, classes=2)
    sources = [Source(str(subject), repeats=2), Source(str(cls), class_images=True)]
    plan = plan_dataset(sources, SPEC, flip=True)
    instance = [i for i in plan.train if not i.sample.is_class]
    classes = [i for i in plan.train if i.sample.is_class]
    assert len(instance) == 3 * 2 * 2 and len(classes) == len(instance)  # repeats and mirrors counted; 4 class views cycled
    assert {i.sample.name for i in classes} == {str(p) for p in cls.glob("*.png")}
    held = plan_dataset(sources, SPEC, validation_split=2)
    assert len(held.validation) == 2 and not any(i.sample.is_class for i in held.validation)
    views = lambda items: [(i.sample.name, i.crop, i.sample.is_class) for i in items]  # noqa: E731
    assert views(plan_dataset(sources, SPEC, flip=True).train) == views(plan.train)  # fixed by the scan: resumes see the same epoch
    assert "items per epoch: 24 (repeats and flipped copies included)\n  of which 12 class images" in summary(plan)
    with pytest.raises(DataError, match="class images .* but no instance images"):
        plan_dataset([Source(str(cls), class_images=True)], SPEC)


def test_class_source_mistakes_are_one_paragraph_errors():
    for sources, train_section, message in [
        ([{"path": "a"}, {"path": "b", "class_prompt": "a dog"}], {}, "set class_images: true on the source b"),
        ([{"path": "a"}, {"path": "b", "class_images": True, "num_class_images": 10}], {}, "needs class_prompt"),
        ([{"path": "b", "class_images": True}], {}, "every data source has class_images: true"),
        ([{"path": "a"}], {"prior_loss_weight": 0.5}, "no data source has them"),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"data": {"sources": sources}, "train": train_section})
    with pytest.raises(RecipeError, match="no data source has them"):
        recipe_from_dict({"train": {"prior_loss_weight": 2.0}})


def _weighted_run(model, tmp_path, subject, cls, weight):
    sources = json.dumps([{"path": str(subject)}, {"path": str(cls), "class_images": True}])
    return main(_args(model, tmp_path, f"data.sources={sources}", "data.path=null", "data.num_workers=0", "data.caption_dropout=0",
                      "train.batch_size=1", "train.max_steps=6", "train.learning_rate=1e-12", "train.log_every=1",
                      f"train.prior_loss_weight={weight}", f"output.name=w{weight}", "train.lr_warmup_steps=0"))


def test_a_run_with_class_images_weights_exactly_their_batches(tiny_v, tmp_path):
    """One epoch (3 instance + 3 class items) in batches of 1, with a learning rate too small
    to move the weights: the same draws at prior_loss_weight 1 and 3 give the same loss on
    the instance batches and three times it on the class batches."""
    subject, cls = _instance_and_class(tmp_path, instances=3, classes=2)
    one = _weighted_run(tiny_v, tmp_path, subject, cls, 1.0)
    three = _weighted_run(tiny_v, tmp_path, subject, cls, 3.0)
    ratios = sorted(round(b / a, 4) for a, b in zip(one.losses, three.losses))
    assert ratios == [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]


def test_an_sdxl_base_draws_its_class_images_and_weights_their_batches(tiny_sdxl, tmp_path):
    """DreamBooth on SDXL: the class images are drawn by the SDXL pipeline (both encoders,
    size conditioning), and their weight reaches SDXL's loss: at prior_loss_weight 0 the
    class batches' loss is exactly 0 and the subject's is not."""
    subject, _ = _instance_and_class(tmp_path, instances=2, classes=0)
    drawn = tmp_path / "drawn"
    sources = json.dumps([{"path": str(subject)},
                          {"path": str(drawn), "class_images": True, "class_prompt": "a shape", "num_class_images": 2}])
    result = main(_args(tiny_sdxl, tmp_path, f"data.sources={sources}", "data.path=null", "data.num_workers=0",
                        "data.caption_dropout=0", "train.batch_size=1", "train.max_steps=4", "train.learning_rate=1e-12",
                        "train.log_every=1", "train.prior_loss_weight=0", "train.lr_warmup_steps=0"))
    images = sorted(drawn.glob("*.png"))
    assert [p.name for p in images] == ["class-00000.png", "class-00001.png"]
    assert all(Image.open(p).size == (64, 64) and p.with_suffix(".txt").read_text() == "a shape\n" for p in images)
    assert len({p.read_bytes() for p in images}) == 2  # two seeds, two pictures
    assert generate_class_images(drawn, "a shape", 2, 64, 0, str(tiny_sdxl), False) == 0  # full: nothing more to draw
    losses = sorted(result.losses)  # an epoch: 2 subject items and 2 class items, one per step
    assert losses[:2] == [0.0, 0.0] and min(losses[2:]) > 0, result.losses


def test_a_resumed_run_with_class_images_matches_a_straight_one(tiny_v, tmp_path):
    subject, cls = _instance_and_class(tmp_path, instances=3, classes=2)
    sources = json.dumps([{"path": str(subject)}, {"path": str(cls), "class_images": True}])

    def run(out, *extra):
        return main([*_args(tiny_v, tmp_path, f"data.sources={sources}", "data.path=null", "data.num_workers=0",
                            "train.batch_size=2", "train.max_steps=5", "train.prior_loss_weight=0.5", "checkpoint.every_steps=2",
                            f"output.dir={out}", "train.deterministic=true"), *extra])

    straight = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "tiny-demo" / "step-00000004")
    resumed = run(tmp_path / "b", "--resume", "latest")  # from step 2: mid-epoch (6 items in 3 batches)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[2:]), rtol=0, atol=0)


def test_missing_class_images_are_drawn_once_with_captions_and_the_seed_fixes_them(tiny_eps, tmp_path):
    folder = _copy(tmp_path / "dogs", sorted(SAMPLE.glob("*.png"))[:1], "a dog")
    assert generate_class_images(folder, "a dog", 3, 64, 5, str(tiny_eps), False) == 2
    drawn = sorted(folder.glob("class-*.png"))
    assert len(drawn) == 2 and all(p.with_suffix(".txt").read_text() == "a dog\n" for p in drawn)
    assert all(Image.open(p).size == (64, 64) for p in drawn)
    before = {p: p.read_bytes() for p in folder.iterdir()}
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    source = SimpleNamespace(path=str(folder), class_images=True, class_prompt="a dog", num_class_images=3)
    fill_class_folders([source], str(tiny_eps), False, 64, 5, accelerator)  # enough there: nothing drawn
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    other = tmp_path / "again"
    generate_class_images(other, "a dog", 2, 64, 5, str(tiny_eps), False)  # the same seed: the same images
    assert [p.read_bytes() for p in sorted(other.glob("*.png"))] == [before[p] for p in drawn]
    generate_class_images(tmp_path / "seed6", "a dog", 1, 64, 6, str(tiny_eps), False)
    assert (tmp_path / "seed6" / "class-00000.png").read_bytes() != (other / "class-00000.png").read_bytes()


def test_the_dreambooth_recipe_runs_and_draws_its_class_images(tiny_eps, tmp_path):
    """recipes/dreambooth.yaml as shipped but for where things are and how long it runs (64 px: the tiny model)."""
    raw = yaml.safe_load((ROOT / "recipes" / "dreambooth.yaml").read_text())
    subject = _copy(tmp_path / "subject", sorted(SAMPLE.glob("*.png"))[:2])
    raw["model"]["path"] = str(tiny_eps)
    raw["data"]["sources"][0]["path"] = str(subject)
    raw["data"]["sources"][1] |= {"path": str(tmp_path / "class"), "num_class_images": 2}
    raw["data"] |= {"resolution": 64, "cache_dir": str(tmp_path / "cache")}
    raw["train"] |= {"max_steps": 2, "batch_size": 1, "mixed_precision": "no", "gradient_checkpointing": False}
    raw["output"]["dir"] = str(tmp_path / "out")
    recipe = recipe_from_dict(raw)
    assert recipe.train.prior_loss_weight == load_recipe(ROOT / "recipes" / "dreambooth.yaml").train.prior_loss_weight
    result = train(recipe)
    assert result.steps == 2 and result.output.is_file()
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["class-00000.png", "class-00000.txt", "class-00001.png", "class-00001.txt"]


def test_the_dreambooth_recipe_without_the_users_files_stops_before_drawing(tmp_path, capsys, monkeypatch):
    from sdtune.cli import main as cli_main

    monkeypatch.chdir(tmp_path)  # where neither models/ nor my_subject/ exist
    code = cli_main(["train", "--recipe", str(ROOT / "recipes" / "dreambooth.yaml"),
                     "--set", f"output.dir={tmp_path / 'out'}", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "data.sources[0].path my_subject does not exist" in err, err
    assert not (tmp_path / "class_images").exists()


def test_class_images_are_drawn_only_into_a_folder_of_images_with_captions(tmp_path):
    subject, cls = _instance_and_class(tmp_path, instances=1, classes=1)
    (cls / "metadata.jsonl").write_text('{"file_name": "001.png", "text": "a shape"}\n')
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    sources = [SimpleNamespace(path=str(subject), kind="auto", class_images=False, num_class_images=0),
               SimpleNamespace(path=str(cls), kind="auto", class_images=True, class_prompt="a shape", num_class_images=3)]
    with pytest.raises(DataError, match=r"data.sources\[1\] draws class images into .* not a folder of images with .txt captions"):
        fill_class_folders(sources, str(tmp_path / "no-model"), False, 64, 0, accelerator)
    (cls / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="model.path .*no-model does not exist; class images are drawn with the base model"):
        fill_class_folders(sources, str(tmp_path / "no-model"), False, 64, 0, accelerator)
