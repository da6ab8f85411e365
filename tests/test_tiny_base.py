"""The tiny base trained from scratch: VAE training, the build command (a short version), and
the recipe it runs. The shipped weights' drawing is judged in tests/test_tiny_base_draws.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftest import ROOT
from sdtune import world
from sdtune.recipe import load_recipe
from sdtune.tiny_base import BUILD_FILE, tiny_base_vae
from sdtune.vae_training import evaluate_vae, load_images, train_vae


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = world.write_dataset(tmp_path_factory.mktemp("world") / "data", world.scenes(48, 1))
    return load_images(folder, world.SIDE)


def test_vae_training_lowers_reconstruction_error_and_sets_the_scaling_factor(images):
    torch.manual_seed(0)
    vae = tiny_base_vae()
    before, _, _ = evaluate_vae(vae.eval(), images, "cpu")
    report = train_vae(vae, images, steps=60, batch_size=8, seed=0, log_every=0)
    assert report.reconstruction < 0.92 * before, (before, report.reconstruction)
    # Latents scaled by the stored factor have unit variance, as the diffusion model expects.
    with torch.no_grad():
        latents = vae.encode(images.float() / 127.5 - 1).latent_dist.mean
    assert vae.config.scaling_factor == pytest.approx(report.scaling_factor)
    assert (latents * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-3)
    # The same seed trains the same VAE.
    first, again = [], []
    for out in (first, again):
        torch.manual_seed(1)
        model = tiny_base_vae()
        train_vae(model, images, steps=4, batch_size=4, seed=1, log_every=0)
        out += list(model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_vae_training_refuses_images_of_another_size(tmp_path):
    world.write_dataset(tmp_path / "d", world.scenes(2, 0))
    with pytest.raises(ValueError, match="trains on 32x32 images"):
        load_images(tmp_path / "d", 32)


def test_the_base_recipe_trains_from_scratch_with_the_issues_machinery():
    recipe = load_recipe(ROOT / "recipes" / "tiny_base.yaml")
    assert recipe.train.method == "full" and recipe.train.full_text_encoder
    assert recipe.ema.enabled and recipe.data.caption_dropout > 0 and recipe.train.lr_scheduler == "one_cycle"
    assert recipe.preview.prompts and recipe.data.validation_split > 0
    assert set(recipe.export.formats) == {"diffusers", "single_file"}


def test_short_build_writes_a_model_that_diffusers_loads(tmp_path, capsys):
    """`sdtune make-tiny DIR --trained` end to end, at a size CI affords: data, VAE, the
    UNet and text encoder from their random start through the normal trainer, report."""
    from sdtune.cli import main

    out = tmp_path / "base"
    code = main(["make-tiny", str(out), "--trained", "--images", "24", "--vae-steps", "6", "--seed", "3",
                 "--set", "train.max_steps=6", "--set", "train.batch_size=4", "--set", "data.validation_split=4",
                 "--set", "train.lr_warmup_steps=2", "--set", "validation.every_steps=3", "--set", "preview.every_steps=3",
                 "--set", "preview.steps=2", "--set", "train.log_every=3"])
    assert code == 0, capsys.readouterr().err
    build = out.with_name("base-build")
    record = json.loads((out / BUILD_FILE).read_text())
    assert (record["seed"], record["images"], record["vae_steps"], record["unet_steps"]) == (3, 24, 6, 6)
    assert record["recipe"]["train"]["method"] == "full" and record["seconds"]["total_s"] > 0
    report = (build / "tiny-base.report.html").read_text()
    assert "validation" in report.lower() and (build / "previews").is_dir()
    assert (build / "tiny-base.safetensors").is_file()  # the single file, for the UIs

    # Trained from the random start: every UNet and text-encoder tensor moved; the VAE is the trained one.
    start, result = build / "start", out
    for part in ("unet", "text_encoder"):
        before = load_file(next((start / part).glob("*.safetensors")))
        after = load_file(next((result / part).glob("*.safetensors")))
        moved = [k for k in before if not torch.equal(before[k].half(), after[k].half())]
        assert len(moved) > 0.9 * len(before), part
    vae_config = json.loads((result / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(record["vae"]["scaling_factor"], rel=1e-6)
    assert vae_config["scaling_factor"] != 0.18215

    pipe = StableDiffusionPipeline.from_pretrained(result, safety_checker=None, dtype=torch.float32)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    # A rebuild with other UNet settings reuses the trained VAE (same seed, images, VAE steps).
    import shutil

    shutil.rmtree(out)
    capsys.readouterr()
    assert main(["make-tiny", str(out), "--trained", "--images", "24", "--vae-steps", "6", "--seed", "3",
                 "--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "data.validation_split=4",
                 "--set", "preview.prompts=[]"]) == 0
    assert "reusing the trained VAE" in capsys.readouterr().out
    assert json.loads((out / BUILD_FILE).read_text())["vae"] == record["vae"]

    # The LoRA demo on it: the demo recipe on the trigger set, a kohya file for this base.
    from sdtune.export.kohya import read_lora
    from sdtune.tiny_base import train_trigger_lora

    lora = train_trigger_lora(out, tmp_path / "lora", steps=2, images=8, seed=3,
                              overrides=["data.validation_split=2", "train.batch_size=2", "preview.steps=2"])
    tensors, metadata = read_lora(lora)
    assert any(k.startswith("lora_unet_") for k in tensors) and metadata["ss_base_model_version"] == "sd_v1"
    captions = [p.read_text() for p in (tmp_path / "lora" / "trigger-8-seed3").glob("*.txt")]
    assert len(captions) == 8 and all("zwx" in c for c in captions)


def test_build_mistakes_are_one_paragraph(tmp_path, capsys):
    from sdtune.cli import main

    (tmp_path / "there").mkdir()
    assert main(["make-tiny", str(tmp_path / "there"), "--trained"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["make-tiny", str(tmp_path / "x"), "--trained", "--set", "train.max_step=3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err
    assert main(["make-tiny", str(tmp_path / "y"), "--trained", "--arch", "sd2"]) == 2
    assert "SD 1.x-kind base only" in capsys.readouterr().err


def _unet_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_random_init_keeps_the_architecture_and_draws_fresh_weights_from_the_seed(tiny_v):
    """model.init: random: the same UNet/text-encoder classes and configs as the folder, new
    weights drawn from the seed (the same seed, the same weights), the VAE as saved, and
    identities that keep the text cache of the saved encoder from being reused."""
    from sdtune.models import load_components

    saved = load_components(tiny_v, "v_prediction", True)
    fresh = load_components(tiny_v, "v_prediction", True, random_init_seed=3)
    again = load_components(tiny_v, "v_prediction", True, random_init_seed=3)
    other = load_components(tiny_v, "v_prediction", True, random_init_seed=4)
    assert fresh.unet.config == saved.unet.config and fresh.text_encoder.config.to_dict() == saved.text_encoder.config.to_dict()
    assert not _unet_equal(fresh.unet, saved.unet) and not _unet_equal(fresh.text_encoder, saved.text_encoder)
    assert _unet_equal(fresh.unet, again.unet) and _unet_equal(fresh.text_encoder, again.text_encoder)
    assert not _unet_equal(fresh.unet, other.unet)
    assert _unet_equal(fresh.vae, saved.vae)
    assert fresh.text_encoder_sha256 not in (saved.text_encoder_sha256, other.text_encoder_sha256)
    assert fresh.sha256 != saved.sha256 and fresh.vae_sha256 == saved.vae_sha256
    state = torch.random.get_rng_state()
    load_components(tiny_v, "v_prediction", True, random_init_seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the run's own randomness is untouched


def test_a_run_with_random_init_trains_the_fresh_weights(tiny_v, small_dataset, tmp_path):
    """The recipe field reaches the trainer: with a vanishing learning rate, what the run
    trained is the seed's fresh UNet, not the folder's."""
    from sdtune.models import load_components
    from sdtune.train import main

    args = ["--recipe", "recipes/tiny_demo.yaml", "--set", f"model.path={tiny_v}", "--set", f"data.path={small_dataset}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"output.dir={tmp_path / 'out'}",
            "--set", "train.logger=none", "--set", "preview.prompts=[]", "--set", "data.validation_split=0",
            "--set", "train.method=full", "--set", "model.init=random", "--set", "train.seed=7",
            "--set", "train.max_steps=1", "--set", "train.learning_rate=1e-12", "--set", "export.formats=[diffusers]"]
    result = main(args)
    fresh = load_components(tiny_v, "v_prediction", True, random_init_seed=7).unet
    saved = load_components(tiny_v, "v_prediction", True).unet
    trained = dict(result.unet.named_parameters())
    assert all(torch.allclose(trained[k], v, atol=1e-6) for k, v in fresh.named_parameters())
    assert not all(torch.allclose(trained[k], v, atol=1e-3) for k, v in saved.named_parameters())


def test_random_init_needs_a_full_fine_tune():
    from sdtune.errors import RecipeError

    with pytest.raises(RecipeError, match="model.init: random .* needs train.method: full"):
        load_recipe(ROOT / "recipes/tiny_demo.yaml", ["model.init=random"])


def test_shape_weighting_counts_the_shapes_pixels_more(images):
    """The VAE's second stage: the pixels that stand out from the border colour (the shape)
    are found exactly, and weigh 1 + shape_weight times in the reconstruction loss."""
    from sdtune.vae_training import shape_pixels, to_model_range, vae_loss

    scene = world.Scene(kind="square", colour="red", position="center", background="blue", size=0.4, caption="")
    picture = to_model_range(torch.from_numpy(np.asarray(world.render(scene)).copy()).permute(2, 0, 1)[None])
    found = shape_pixels(picture)[0, 0]
    differs = (picture[0] - picture[0, :, 0, 0, None, None]).abs().sum(0) > 0.3
    assert torch.equal(found.bool(), differs) and 0.02 < found.mean() < 0.5

    torch.manual_seed(0)
    vae = tiny_base_vae()
    pixels = to_model_range(images[:4])
    _, plain, _ = vae_loss(vae, pixels, 1e-4, torch.Generator().manual_seed(0))
    _, weighted, _ = vae_loss(vae, pixels, 1e-4, torch.Generator().manual_seed(0), shape_weight=4.0)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        error = (vae.decode(posterior.sample(torch.Generator().manual_seed(0))).sample - pixels).abs()
    weights = 1 + 4.0 * shape_pixels(pixels)
    assert plain.item() == pytest.approx(error.mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx(((error * weights).sum() / (weights.sum() * 3)).item(), rel=1e-5)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)
