"""Sampling on the tiny model at 64x64 with 2-3 steps: samplers, LoRA weights, infotext, grids, v/ZTSNR, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import save_file

from sdtune import atomic, cli
from sdtune.adapters import add_lora, lora_layers
from sdtune.export.kohya import kohya_state_dict
from sdtune.export.metadata import lora_metadata
from sdtune.grid import Axis, axis_label, draw_grid, parse_axis
from sdtune.infotext import format_parameters, parse_parameters, read_png_parameters
from sdtune.models import load_components
from sdtune.export.markers import stated_flags
from sdtune.pipeline import load_pipeline, set_lora_weights
from sdtune.sample import Job, job_from_parameters, job_parameters
from sdtune.samplers import SAMPLERS, DDPMMeanScheduler, generate, make_sampler, sampling_config

SIZE = (64, 64)


def _random_lora(base, seed=0):
    """The tiny model with a LoRA on its UNet attention and text encoder, with random
    (non-zero) up weights so it visibly changes the model."""
    parts = load_components(base, "epsilon", False)
    add_lora(parts.unet, rank=4, alpha=2, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    add_lora(parts.text_encoder, rank=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [*lora_layers(parts.unet).values(), *lora_layers(parts.text_encoder).values()]:
            up = layer.lora_B["default"].weight
            up.copy_(0.5 * torch.randn(up.shape, generator=gen))
    return parts


def _write_lora(base, path, prediction_type="epsilon", zero_terminal_snr=False, seed=0):
    parts = _random_lora(base, seed)
    metadata = lora_metadata(
        base_model_version="sd_v1", prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr,
        rank=4, alpha=2, resolution=64, steps=1, learning_rate=1e-4, num_images=1, seed=seed,
        base_model_name="tiny", base_model_sha256="0" * 64, title=path.stem, recipe_json="{}", trained_text_encoder=True,
    )
    return atomic.save_safetensors(kohya_state_dict(parts.unet, parts.text_encoder, torch.float32), path, metadata)


@pytest.fixture(scope="module")
def tiny_lora(tiny_eps, tmp_path_factory):
    return _write_lora(tiny_eps, tmp_path_factory.mktemp("loras") / "tiny_lora.safetensors")


@pytest.fixture(scope="module")
def eps_with_lora(tiny_eps, tiny_lora):
    return load_pipeline(tiny_eps, [tiny_lora])


def _pixels(images):
    return np.stack([np.asarray(image) for image in images])


def _generate(model, sampler="euler", steps=2, seeds=(1, 2), cfg_rescale=0.0):
    scheduler = make_sampler(sampler, model.sampling_config)
    return generate(model.pipe, ["a red square", "a blue circle"], scheduler, steps, 5.0, cfg_rescale, list(seeds), SIZE)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_sampler_runs_on_the_tiny_model(eps_with_lora, sampler):
    images = _generate(eps_with_lora, sampler)
    assert [image.size for image in images] == [SIZE, SIZE]
    pixels = _pixels(images)
    assert pixels.std() > 1  # an image, not a blank
    assert not np.array_equal(pixels[0], pixels[1])  # different prompts and seeds
    np.testing.assert_array_equal(_pixels(_generate(eps_with_lora, sampler)), pixels)  # seeded


def test_ddpm_without_noise_is_the_ddpm_step_minus_its_noise(tiny_v):
    """--ddpm-no-noise steps to DDPM's posterior mean exactly: DDPMScheduler's step with a
    seeded noise draw, minus sigma_t times that same draw. Also at the last step
    (sigma = 0, x0_hat) and on a zero-terminal-SNR v schedule."""
    base = DDPMScheduler.load_config(tiny_v, subfolder="scheduler")
    for ztsnr in (False, True):
        config = sampling_config(base, "v_prediction", ztsnr)
        ddpm, mean = DDPMScheduler.from_config(config), make_sampler("ddpm", config, ddpm_noise=False)
        assert isinstance(mean, DDPMMeanScheduler)
        ddpm.set_timesteps(4)
        mean.set_timesteps(4)
        assert ddpm.timesteps.tolist() == mean.timesteps.tolist()
        sample_gen = torch.Generator().manual_seed(0)
        x, v = torch.randn(2, 4, 8, 8, generator=sample_gen), torch.randn(2, 4, 8, 8, generator=sample_gen)
        for t in ddpm.timesteps:
            noisy = ddpm.step(v, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
            sigma = ddpm._get_variance(int(t)) ** 0.5 if int(t) > 0 else 0.0
            torch.testing.assert_close(mean.step(v, t, x).prev_sample, noisy - sigma * z, rtol=0, atol=1e-5)


def test_ddpm_without_noise_samples_and_says_so(eps_with_lora):
    model = eps_with_lora
    config = model.sampling_config
    with_noise = generate(model.pipe, ["a red square"], make_sampler("ddpm", config), 3, 5.0, 0.0, [1], SIZE)
    without = generate(model.pipe, ["a red square"], make_sampler("ddpm", config, ddpm_noise=False), 3, 5.0, 0.0, [1], SIZE)
    assert not np.array_equal(_pixels(with_noise), _pixels(without))
    with pytest.raises(ValueError, match="ddpm sampler only"):
        make_sampler("euler", config, ddpm_noise=False)


def test_lora_weight_zero_is_the_base_exactly_and_one_differs(tiny_eps, eps_with_lora):
    base = load_pipeline(tiny_eps)
    model = eps_with_lora
    base_images = _pixels(_generate(base))

    set_lora_weights(model, (1.0,))
    at_one = _pixels(_generate(model))
    set_lora_weights(model, (0.0,))
    at_zero = _pixels(_generate(model))
    np.testing.assert_array_equal(at_zero, base_images)
    assert np.abs(at_one.astype(int) - base_images).max() > 10
    # The weights themselves are the base's, bit for bit, after going to 1 and back.
    for ours, theirs in ((model.pipe.unet, base.pipe.unet), (model.pipe.text_encoder, base.pipe.text_encoder)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name


def test_a_diffusers_format_lora_merges_like_its_kohya_twin(tiny_eps, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    parts = _random_lora(tiny_eps, seed=3)
    kohya = atomic.save_safetensors(kohya_state_dict(parts.unet, parts.text_encoder, torch.float32), tmp_path / "k.safetensors")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "d",
        unet_lora_layers=get_peft_model_state_dict(parts.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(parts.text_encoder),
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 2},
        text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": 4},
    )
    ours, theirs = load_pipeline(tiny_eps, [kohya]), load_pipeline(tiny_eps, [tmp_path / "d" / "pytorch_lora_weights.safetensors"])
    assert ours.loras[0].tensors.keys() == theirs.loras[0].tensors.keys()
    set_lora_weights(ours, (1.0,))
    set_lora_weights(theirs, (1.0,))
    for a, b in ((ours.pipe.unet, theirs.pipe.unet), (ours.pipe.text_encoder, theirs.pipe.text_encoder)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    np.testing.assert_array_equal(_pixels(_generate(ours)), _pixels(_generate(theirs)))


def test_infotext_parses_back_to_the_same_job(eps_with_lora, tmp_path):
    job = Job(
        prompt="a red square, on grey: centred", negative="blurry, low contrast", sampler="dpmpp_2m", steps=23,
        cfg=6.5, cfg_rescale=0.7, seed=4_000_000_001, width=64, height=96, loras=(("tiny_lora", 0.75),),
    )
    text = job_parameters(job, eps_with_lora)
    prompt, negative, params = parse_parameters(text)
    assert prompt == "a red square, on grey: centred <lora:tiny_lora:0.75>" and negative == "blurry, low contrast"
    assert params["Sampler"] == "DPM++ 2M" and params["Size"] == "64x96" and params["CFG scale"] == "6.5"
    assert params["Lora hashes"] == f"tiny_lora: {eps_with_lora.loras[0].short_hash}"
    assert params["Model hash"] == eps_with_lora.short_hash and len(eps_with_lora.short_hash) == 10
    assert ', Lora hashes: "tiny_lora: ' in text  # quoted, as A1111 writes a value holding ':'
    assert job_from_parameters(text) == job

    off = Job(prompt="line one\nline two", negative="", sampler="ddpm", steps=3, cfg=7.0, cfg_rescale=0.0,
              seed=0, width=64, height=64, loras=(("tiny_lora", 0.0),), ddpm_noise=False)
    text = job_parameters(off, eps_with_lora)
    assert "Negative prompt" not in text and "Lora hashes" not in text and "<lora:" not in text
    assert "DDPM noise: off" in text
    assert job_from_parameters(text) == Job(**{**off.__dict__, "loras": ()})  # weight 0 is no LoRA at all

    from sdtune.infotext import save_png

    save_png(Image.new("RGB", SIZE), tmp_path / "x.png", text)
    assert read_png_parameters(tmp_path / "x.png") == text


def test_parses_an_a1111_infotext():
    text = (
        "girl with a beret, (detailed:1.2)\nNegative prompt: ugly, blurry\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, '
        'Lora hashes: "a: 0123456789ab, b: ba9876543210", Version: v1.10.1'
    )
    prompt, negative, params = parse_parameters(text)
    assert (prompt, negative) == ("girl with a beret, (detailed:1.2)", "ugly, blurry")
    assert params["Lora hashes"] == "a: 0123456789ab, b: ba9876543210" and params["Version"] == "v1.10.1"
    job = job_from_parameters(text)
    assert (job.sampler, job.steps, job.cfg, job.seed, job.width, job.height) == ("euler_a", 20, 7.0, 965400086, 512, 768)
    # No parameter line (fewer than 3 pairs): all of it is prompt, as in A1111.
    assert parse_parameters("just a prompt: with a colon")[0] == "just a prompt: with a colon"
    assert format_parameters("p", "", {"Steps": 2, "Skip": None}) == "p\nSteps: 2"


def test_grid_has_cell_size_times_count_and_drawn_labels():
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    cells = [[Image.new("RGB", SIZE, colours[c]) for c in range(3)] for _ in range(2)]
    steps, cfg = Axis("steps", (10, 20, 40)), Axis("cfg", (3.0, 7.5))
    grid = draw_grid(cells, [axis_label(steps, v) for v in steps.values], [axis_label(cfg, v) for v in cfg.values])
    pixels = np.asarray(grid).astype(int)
    height, width = pixels.shape[:2]
    left, top = width - 3 * 64, height - 2 * 64
    assert left > 0 and top > 0
    # Every cell is its image, at cell size x index.
    for r in range(2):
        for c in range(3):
            cell = pixels[top + r * 64 : top + (r + 1) * 64, left + c * 64 : left + (c + 1) * 64]
            assert (cell == colours[c]).all()
    # Ink over each column (in the top strip) and beside each row (in the left strip); white elsewhere there.
    for c in range(3):
        assert (pixels[:top, left + c * 64 : left + (c + 1) * 64] < 128).any(), f"no label over column {c}"
    for r in range(2):
        assert (pixels[top + r * 64 : top + (r + 1) * 64, :left] < 128).any(), f"no label beside row {r}"
    assert (pixels[:top, :left] == 255).all()  # the corner stays blank
    assert [axis_label(cfg, v) for v in cfg.values] == ["cfg: 3", "cfg: 7.5"]

    one_row = draw_grid([cells[0]], ["a", "b", "c"], [])
    assert one_row.width == 3 * 64 and one_row.height > 64


def test_grid_axes_parse_and_fail_clearly():
    assert parse_axis("steps:10,20,40") == Axis("steps", (10, 20, 40))
    assert parse_axis("lora weight:0,0.5,1") == Axis("lora", (0.0, 0.5, 1.0))
    assert parse_axis("prompt:a cat, red|a dog") == Axis("prompt", ("a cat, red", "a dog"))
    with pytest.raises(ValueError, match="one of steps, cfg"):
        parse_axis("stepz:1,2")
    with pytest.raises(ValueError, match="must be ints"):
        parse_axis("steps:1,two")


def test_ztsnr_lora_samples_with_trailing_spacing_and_rescale_without_flags(tiny_eps, tmp_path):
    """The base folder says epsilon; the LoRA's metadata says v + zero terminal SNR, and wins."""
    lora = _write_lora(tiny_eps, tmp_path / "vz.safetensors", "v_prediction", zero_terminal_snr=True)
    model = load_pipeline(tiny_eps, [lora])
    assert (model.prediction_type, model.zero_terminal_snr) == ("v_prediction", True)
    for name in ("euler", "dpmpp_2m", "ddim", "ddpm"):
        config = make_sampler(name, model.sampling_config).config
        assert config.timestep_spacing == "trailing" and config.rescale_betas_zero_snr, name
        assert config.prediction_type == "v_prediction"
    scheduler = make_sampler("euler", model.sampling_config)
    scheduler.set_timesteps(3)
    assert scheduler.timesteps[0] == 999  # trailing: the first step is the pure-noise timestep
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        make_sampler("heun", model.sampling_config)

    out = tmp_path / "out"
    assert cli.main(["sample", "--model", str(tiny_eps), "--lora", str(lora), "--prompt", "a red square",
                     "--steps", "2", "--seed", "3", "--out", str(out)]) == 0
    job = job_from_parameters(read_png_parameters(out / "00000-3.png"))
    assert job.cfg_rescale == 0.7 and job.loras == (("vz", 1.0),)


def test_ztsnr_diffusers_folder_is_read_from_its_scheduler_config(tiny_v, tmp_path):
    folder = tmp_path / "vz-folder"
    shutil.copytree(tiny_v, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "rescale_betas_zero_snr": True}))
    model = load_pipeline(folder)
    assert (model.prediction_type, model.zero_terminal_snr) == ("v_prediction", True)
    assert make_sampler("euler_a", model.sampling_config).config.timestep_spacing == "trailing"
    plain = load_pipeline(tiny_v)
    assert (plain.prediction_type, plain.zero_terminal_snr) == ("v_prediction", False)
    assert make_sampler("euler_a", plain.sampling_config).config.timestep_spacing == "leading"


def test_single_file_markers_are_read(tmp_path):
    marked = tmp_path / "marked.safetensors"
    save_file({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([]), "x": torch.zeros(1)}, marked)
    assert stated_flags(marked) == ("v_prediction", True)
    by_metadata = tmp_path / "meta.safetensors"
    save_file({"x": torch.zeros(1)}, by_metadata, {"modelspec.prediction_type": "v", "sdtune.zero_terminal_snr": "False"})
    assert stated_flags(by_metadata) == ("v_prediction", False)
    sidecar = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, sidecar)
    assert stated_flags(sidecar) == (None, None)
    sidecar.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert stated_flags(sidecar) == ("v_prediction", None)


def test_single_file_checkpoint_samples_with_its_markers(tiny_v, tmp_path):
    from sdtune.export.commands import export_checkpoint
    from sdtune.models import file_sha256

    single = export_checkpoint(tiny_v, tmp_path / "v.safetensors", zero_terminal_snr=True, dtype="fp32")[0]
    model = load_pipeline(single)
    assert (model.prediction_type, model.zero_terminal_snr) == ("v_prediction", True)
    assert make_sampler("euler_a", model.sampling_config).config.timestep_spacing == "trailing"
    assert model.short_hash == file_sha256(single)[:10]  # A1111's model hash
    folder = load_pipeline(tiny_v).pipe.unet.state_dict()
    assert all(torch.equal(value, folder[name]) for name, value in model.pipe.unet.state_dict().items())
    # It draws what the folder draws under the same sampling settings, and not a flat image.
    images = _pixels(_generate(model, steps=2, seeds=(3, 4)))
    as_folder = load_pipeline(tiny_v)
    as_folder.sampling_config = model.sampling_config
    np.testing.assert_array_equal(images, _pixels(_generate(as_folder, steps=2, seeds=(3, 4))))
    assert images.std(axis=(1, 2, 3)).min() > 1.0


def test_cli_grid_compare_and_prompt_file(tiny_eps, tiny_v, tiny_lora, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    out = tmp_path / "out"
    common = ["sample", "--model", str(tiny_eps), "--lora", f"{tiny_lora}:0.5", "--size", "64x64", "--seed", "11", "--out", str(out)]

    assert cli.main([*common, "--prompt-file", str(prompts), "--steps", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-11.png", "00001-11.png"]
    job = job_from_parameters(read_png_parameters(out / "00001-11.png"))
    assert (job.prompt, job.steps, job.loras, job.cfg_rescale) == ("a blue circle", 2, (("tiny_lora", 0.5),), 0.0)

    assert cli.main([*common, "--prompt", "a red square", "--grid", "x=steps:2,3", "y=lora:0,1"]) == 0
    grid = Image.open(out / "grid-0000.png")
    assert 2 * 64 < grid.width < 2 * 64 + 128 and 2 * 64 < grid.height < 2 * 64 + 128  # labels on both axes
    assert len(list(out.glob("0*.png"))) == 2 + 4  # numbering went on; nothing was replaced
    cells = {(j.steps, j.loras) for j in (job_from_parameters(read_png_parameters(p)) for p in sorted(out.glob("0*.png"))[2:])}
    assert cells == {(2, ()), (3, ()), (2, (("tiny_lora", 1.0),)), (3, (("tiny_lora", 1.0),))}

    assert cli.main([*common, "--prompt", "a red square", "--n", "2", "--steps", "2", "--compare"]) == 0
    compare = Image.open(out / "compare-0000.png")
    assert compare.width > 2 * 64 and compare.height > 2 * 64
    assert "compare-0000.png" in capsys.readouterr().out

    # A full fine-tune against another base folder: no LoRA involved.
    assert cli.main(["sample", "--model", str(tiny_eps), "--compare", str(tiny_v), "--prompt", "a red square",
                     "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    assert Image.open(out / "compare-0001.png").height > 64
    sides = [read_png_parameters(p) for p in sorted(out.glob("0*-1.png"))]
    assert sorted(parse_parameters(text)[2]["Model"] for text in sides) == ["tiny-eps", "tiny-v"]
    assert len({job_from_parameters(text) for text in sides}) == 1  # the same settings on both sides

    assert cli.main(["sample", "--model", str(tiny_eps), "--prompt", "x", "--compare", "--out", str(out)]) == 2
    assert "add --lora" in capsys.readouterr().err
