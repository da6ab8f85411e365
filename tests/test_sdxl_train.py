"""SDXL through the one trainer, on the tiny SDXL topology: size/crop ids from the bucket plan,
pooled embeddings and ids reaching the loss, loss falling, and the exported LoRA / SGM file
reproducing the trained model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.adapters import UNET_PRESETS, add_lora, lora_layers, trainable_parameters
from sdtune.data.images import ImageInfo, load_crop, place_crop
from sdtune.data.plan import BucketSpec, Item, plan_dataset, size_conditioning
from sdtune.data.sources import Source
from sdtune.diffusion import Objective, denoising_loss
from sdtune.export.kohya import merge_lora, read_lora
from sdtune.export.sgm_checkpoint import read_sgm_checkpoint
from sdtune.models import load_components
from sdtune.sdxl import SdxlComponents, SdxlTextEncoders, add_time_ids, encode_sdxl_prompts, is_sdxl
from sdtune.data.captions import tokenize
from sdtune.pipeline import load_pipeline, set_lora_weights
from sdtune.sample import main as sample_main
from sdtune.train import main

SDXL = "sdxl_base_v1-0"


def _args(model, data, tmp_path, *extra):
    sets = [
        f"model.path={model}", "model.prediction_type=epsilon", "model.zero_terminal_snr=false", f"data.path={data}",
        f"data.cache_dir={tmp_path / 'cache'}", f"output.dir={tmp_path / 'out'}", "train.logger=none", "preview.prompts=[]",
        "data.validation_split=0", "train.batch_size=4", "train.lr_warmup_steps=0", *extra,
    ]
    return ["--recipe", "recipes/tiny_demo.yaml", *[item for s in sets for item in ("--set", s)]]


def _ids(parts, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return tokenize(parts.tokenizer, captions), tokenize(parts.tokenizer_2, captions)


def _unet_output(unet, seed: int = 0) -> torch.Tensor:
    """The UNet on fixed inputs, pooled embedding and size/crop ids included."""
    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 77, config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(2, pooled, generator=gen), "time_ids": torch.tensor([[96.0, 200, 0, 10, 48, 80]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), cond, added_cond_kwargs=added).sample


def test_add_time_ids_of_a_cropped_bucketed_image(tmp_path):
    """A 200x96 image at resolution 64 with 16 px buckets goes to the 80x48 bucket: scaled by 1/2
    to 100x48, 20 px of room across. By hand, as (h, w) / (y, x): original (96, 200), target
    (48, 80); the centre cut starts at (0, 10), a cut at a quarter of the room at (0, 5), whose
    mirror image starts at (0, 100 - 5 - 80) = (0, 15) of the mirrored image."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide image")
    plan = plan_dataset([Source(str(tmp_path))], BucketSpec(64, step=16), flip=True)
    centre, mirrored = plan.train
    assert (centre.crop.bucket, centre.crop.resized, centre.size) == ((80, 48), (100, 48), (200, 96))
    assert add_time_ids(*size_conditioning(centre)).tolist() == [96, 200, 0, 10, 48, 80]
    assert mirrored.crop.flip and add_time_ids(*size_conditioning(mirrored)).tolist() == [96, 200, 0, 10, 48, 80]

    info = ImageInfo(200, 96)
    quarter = Item(centre.sample, centre.sha256, place_crop(info, (80, 48), 0.25, 0.5), centre.size)
    mirror = Item(centre.sample, centre.sha256, place_crop(info, (80, 48), 0.25, 0.5, flip=True), centre.size)
    assert add_time_ids(*size_conditioning(quarter)).tolist() == [96, 200, 0, 5, 48, 80]
    assert add_time_ids(*size_conditioning(mirror)).tolist() == [96, 200, 0, 15, 48, 80]
    # The mirrored view is what the ids say: the mirrored, resized image cut at x = 15.
    data = (tmp_path / "wide.png").read_bytes()
    resized = Image.open(io.BytesIO(data)).resize((100, 48), Image.Resampling.LANCZOS).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = torch.from_numpy(np.asarray(resized.crop((15, 0, 95, 48)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    assert torch.equal(load_crop(data, mirror.crop), expected)


def test_sdxl_lora_loss_falls_on_a_fixed_batch(tiny_sdxl):
    """6 AdamW steps of a rank-8 LoRA (kohya's LoCon set) on one fixed batch (real captions through
    both encoders, fixed noise and timesteps, size/crop ids): the epsilon loss falls by at least 40%."""
    torch.manual_seed(0)
    parts = load_components(tiny_sdxl, "epsilon", zero_terminal_snr=False)
    assert isinstance(parts, SdxlComponents) and parts.base_model_version == SDXL
    unet = parts.unet
    add_lora(unet, rank=8, alpha=8, dropout=0.0, target_modules=UNET_PRESETS["locon"])
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=1e-2)
    with torch.no_grad():
        hidden, pooled = encode_sdxl_prompts(parts.text_encoder, parts.text_encoder_2, *_ids(parts, ["a red circle", "a blue square"]))
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    added = {"text_embeds": pooled, "time_ids": torch.stack([add_time_ids((96, 200), (0, 10), (64, 64))] * 2)}
    timesteps = torch.tensor([100, 700])
    losses = []
    for _ in range(6):
        loss = denoising_loss(unet, parts.noise_scheduler, latents, hidden, noise, timesteps, Objective(min_snr_gamma=5.0), added_cond_kwargs=added)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_sdxl_lora_run_exports_a_kohya_file_that_reproduces_the_model(tiny_sdxl, small_dataset, tmp_path, capsys):
    """UNet and both text encoders trained (text encoders in the loop), exported with kohya's SDXL
    names: merged into a fresh base by the UIs' rule, it gives the trained UNet and encoders. A run
    stopped after step 1 and resumed ends with the same file."""
    run = ("train.max_steps=3", "export.dtype=fp32", "lora.alpha=4", "lora.text_encoder=true", "train.learning_rate=1e-2",
           "data.caption_dropout=0.3")
    result = main(_args(tiny_sdxl, small_dataset, tmp_path, *run))
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.text_cache is None and isinstance(result.text_encoder, SdxlTextEncoders)
    tensors, metadata = read_lora(result.output)
    prefixes = {name.split("_")[1] for name in {k.split(".", 1)[0] for k in tensors}}
    assert prefixes == {"unet", "te1", "te2"}
    # CLIP-L's last layer feeds nothing SDXL reads: no LoRA there, and so no "changes nothing" warning.
    layers = {k.split(".", 1)[0] for k in tensors}
    assert "lora_te1_text_model_encoder_layers_10_self_attn_q_proj" in layers and "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in layers
    assert not any(name.startswith("lora_te1_text_model_encoder_layers_11_") for name in layers)
    assert "change nothing" not in capsys.readouterr().err
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in {k.split(".", 1)[0] for k in tensors}  # SGM names
    assert metadata["ss_base_model_version"] == SDXL and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_network_train_unet_only"] == "False"
    assert all(tensors[k].item() == 4.0 for k in tensors if k.endswith(".alpha"))

    base = load_components(tiny_sdxl, "epsilon", zero_terminal_snr=False)
    untouched = _unet_output(base.unet)
    merged_names = merge_lora(tensors, base.unet, base.text_encoder, text_encoder_2=base.text_encoder_2)
    assert len(merged_names) == len(tensors) // 3
    trained = _unet_output(result.unet)
    assert (trained - untouched).abs().max() > 1e-3  # the LoRA did something
    torch.testing.assert_close(_unet_output(base.unet), trained, rtol=0, atol=1e-5)
    ids = _ids(base, ["a red circle on a blue background"])
    with torch.no_grad():
        for ours, theirs in zip(result.text_encoder(*ids), encode_sdxl_prompts(base.text_encoder, base.text_encoder_2, *ids)):
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    # `sdtune sample` loads the base as an SDXL pipeline and applies the file by the same rule.
    model = load_pipeline(tiny_sdxl, [result.output], device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(model.pipe, StableDiffusionXLPipeline)
    set_lora_weights(model, (1.0,))
    torch.testing.assert_close(_unet_output(model.pipe.unet), trained, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.pipe.text_encoder_2(ids[1]).text_embeds, result.text_encoder(*ids)[1], rtol=0, atol=1e-5)

    # The same LoRA as a diffusers/PEFT file (lora_A/lora_B, alphas in lora_adapter_metadata) samples the same.
    peft = {f"{component}.{path}.lora_{part}.weight": getattr(layer, f"lora_{part}")["default"].weight.detach().clone()
            for component, model in (("unet", result.unet), ("text_encoder", result.text_encoder.text_encoder),
                                     ("text_encoder_2", result.text_encoder.text_encoder_2))
            for path, layer in lora_layers(model).items() for part in "AB"}
    adapter = {f"{c}.lora_alpha": 4.0 for c in ("unet", "text_encoder", "text_encoder_2")}
    save_file(peft, tmp_path / "peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(adapter)})
    model = load_pipeline(tiny_sdxl, [tmp_path / "peft.safetensors"], device=torch.device("cpu"), dtype=torch.float32)
    set_lora_weights(model, (1.0,))
    torch.testing.assert_close(_unet_output(model.pipe.unet), trained, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.pipe.text_encoder_2(ids[1]).text_embeds, result.text_encoder(*ids)[1], rtol=0, atol=1e-5)

    resumed_dir, cache = tmp_path / "resumed", f"data.cache_dir={tmp_path / 'cache'}"  # the latents are cached already
    main(_args(tiny_sdxl, small_dataset, resumed_dir, *run, cache, "train.max_steps=2", "checkpoint.every_steps=1"))  # saves step 1
    resumed = main([*_args(tiny_sdxl, small_dataset, resumed_dir, *run, cache, "output.overwrite=true"), "--resume", "latest"])
    assert resumed.losses == result.losses[1:]
    again = read_lora(resumed.output)[0]
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("which, other", [("te1", "te2"), ("te2", "te1")])
def test_a_text_encoder_lora_on_one_of_the_two_encoders(tiny_sdxl, small_dataset, tmp_path, which, other):
    """lora.sdxl_text_encoders: te1 (CLIP-L) or te2 (bigG) alone gets the LoRA; the other stays as it was."""
    result = main(_args(tiny_sdxl, small_dataset, tmp_path, "train.max_steps=1", "export.dtype=fp32", "lora.text_encoder=true",
                        f"lora.sdxl_text_encoders={which}"))
    prefixes = {name.split("_")[1] for name in {k.split(".", 1)[0] for k in read_lora(result.output)[0]}}
    assert prefixes == {"unet", which}
    untouched = getattr(result.text_encoder, {"te1": "text_encoder", "te2": "text_encoder_2"}[other])
    assert not lora_layers(untouched) and not any(p.requires_grad for p in untouched.parameters())


def test_choosing_an_sdxl_text_encoder_on_an_sd_model_says_what_to_change(tiny_eps, small_dataset, tmp_path):
    from sdtune.errors import UserError
    from sdtune.recipe import RecipeError

    with pytest.raises(UserError, match="lora.sdxl_text_encoders: te2 is for SDXL models.*remove the setting"):
        main(_args(tiny_eps, small_dataset, tmp_path, "train.max_steps=1", "lora.text_encoder=true", "lora.sdxl_text_encoders=te2"))
    with pytest.raises(RecipeError, match="lora.sdxl_text_encoders: te1 needs lora.text_encoder: true"):
        main(_args(tiny_eps, small_dataset, tmp_path, "lora.sdxl_text_encoders=te1"))


def test_sdxl_full_finetune_writes_an_sgm_file_that_reads_back(tiny_sdxl, small_dataset, tmp_path):
    """v-prediction with zero terminal SNR on the tiny base: the single file is SGM with the
    v_pred / ztsnr markers, trains again as SDXL (its markers checked against the recipe), and
    holds the trained UNet; the diffusers folder is an SDXL folder. A preview is drawn through
    StableDiffusionXLPipeline."""
    result = main(_args(tiny_sdxl, small_dataset, tmp_path, "train.method=full", "export.dtype=fp32",
                        "train.learning_rate=1e-4", "model.prediction_type=v_prediction", "model.zero_terminal_snr=true",
                        "export.formats=[single_file, diffusers]", "train.max_steps=1",
                        "preview.prompts=[a red circle]", "preview.steps=2", "preview.every_steps=1", "preview.sampler=euler"))
    with Image.open(tmp_path / "out" / "previews" / "tiny-demo" / "step-000001.png") as preview:
        assert preview.width >= 64 and preview.height >= 64
    path = tmp_path / "out" / "tiny-demo.safetensors"
    assert result.output == path and is_sdxl(tmp_path / "out" / "tiny-demo")
    with safe_open(path, "pt") as handle:
        keys = set(handle.keys())
    assert {"v_pred", "ztsnr"} <= keys and any(k.startswith("conditioner.embedders.1.model.") for k in keys)
    checkpoint = read_sgm_checkpoint(path)
    assert (checkpoint.version, checkpoint.prediction_type, checkpoint.zero_terminal_snr) == (SDXL, "v_prediction", True)
    again = load_components(path, "v_prediction", zero_terminal_snr=True)
    assert isinstance(again, SdxlComponents)
    trained = result.unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.unet.state_dict().items())
    base = load_components(tiny_sdxl, "epsilon", zero_terminal_snr=False)
    assert any(not torch.equal(v, trained[k]) for k, v in base.unet.state_dict().items())  # it did train
    with pytest.raises(ValueError, match="set model.prediction_type: v_prediction"):
        load_components(path, "epsilon", zero_terminal_snr=False)

    # `sdtune sample` draws from the file as SDXL, v-prediction with zero terminal SNR from its markers.
    model = load_pipeline(path, device=torch.device("cpu"))
    assert isinstance(model.pipe, StableDiffusionXLPipeline)
    assert (model.prediction_type, model.zero_terminal_snr) == ("v_prediction", True)
    written = sample_main(["--model", str(path), "--prompt", "a red circle", "--steps", "2", "--size", "64x48", "--seed", "1",
                           "--out", str(tmp_path / "samples")])
    with Image.open(written[0]) as image:
        assert image.size == (64, 48) and "Steps: 2" in image.info["parameters"]


def test_pooled_embedding_and_size_ids_reach_the_loss(tiny_sdxl, small_dataset, tmp_path, monkeypatch):
    """Cached text: every sample reaches the loss with its caption's pooled embedding (or, dropped,
    the empty caption's, with the empty caption's hidden states: a caption drops whole) and its
    view's size/crop ids; and the loss depends on both."""

    seen = []

    def record(unet, scheduler, latents, conditioning, noise, timesteps, objective, input_noise=None, **kwargs):
        seen.append({"hidden": conditioning.detach().clone(), "added": {k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()},
                     "args": (unet, scheduler, latents.detach().clone(), conditioning.detach().clone(), noise, timesteps, objective)})
        return denoising_loss(unet, scheduler, latents, conditioning, noise, timesteps, objective, input_noise, **kwargs)

    monkeypatch.setattr("sdtune.loop.denoising_loss", record)
    result = main(_args(tiny_sdxl, small_dataset, tmp_path, "train.max_steps=2", "data.caption_dropout=0.5", "train.seed=3"))
    assert result.text_cache is not None and result.text_cache.encoded > 0

    base = load_components(tiny_sdxl, "epsilon", zero_terminal_snr=False)
    from sdtune.data.plan import plan_data
    from sdtune.recipe import load_recipe

    recipe = load_recipe("recipes/tiny_demo.yaml", [f"data.path={small_dataset}", "data.validation_split=0"])
    plan = plan_data(recipe.data, recipe.train.seed)
    captions = sorted({item.caption for item in plan.train})
    with torch.no_grad():
        hidden, pooled = encode_sdxl_prompts(base.text_encoder, base.text_encoder_2, *_ids(base, captions + [""]))
    expected_ids = {tuple(add_time_ids(*size_conditioning(item)).tolist()) for item in plan.train}
    assert len(expected_ids) > 1  # the images differ in size: the ids tell them apart
    dropped = kept = 0
    for batch in seen:
        for h, p, ids in zip(batch["hidden"], batch["added"]["text_embeds"], batch["added"]["time_ids"]):
            assert tuple(ids.tolist()) in expected_ids
            match = [i for i in range(len(captions) + 1) if torch.allclose(p, pooled[i], atol=1e-5)]
            assert len(match) == 1 and torch.allclose(h, hidden[match[0]], atol=1e-5)
            dropped, kept = dropped + (match[0] == len(captions)), kept + (match[0] < len(captions))
    assert dropped and kept

    unet, scheduler, latents, conditioning, noise, timesteps, objective = seen[-1]["args"]
    added = seen[-1]["added"]

    def loss(**changes):
        with torch.no_grad():
            return denoising_loss(unet, scheduler, latents, conditioning, noise, timesteps, objective,
                                  added_cond_kwargs=added | changes).item()

    reference = loss()
    assert loss(time_ids=added["time_ids"] + torch.tensor([256.0, 0, 0, 0, 0, 0])) != pytest.approx(reference, abs=1e-6)
    assert loss(text_embeds=torch.zeros_like(added["text_embeds"])) != pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_trained_text_encoder_weight_gets_a_gradient(tiny_sdxl, method):
    """What DDP needs of each step (it stops at step 2 when a trained weight got no gradient):
    with both SDXL encoders trained, every trainable tensor gets one from one loss. CLIP-L's
    last layer and final norm feed nothing SDXL reads, so they are left untrained."""
    from sdtune.conditioning import unet_conditioning
    from sdtune.recipe import recipe_from_dict
    from sdtune.sdxl import text_encoders
    from sdtune.trainable import make_trainable as _make_trainable

    parts = load_components(tiny_sdxl, "epsilon", zero_terminal_snr=False)
    encoders = text_encoders(parts)
    lora = recipe_from_dict({"lora": {"text_encoder": True}} if method == "lora" else {}).lora
    groups = _make_trainable(parts.unet, encoders, method, lora, "sdpa", False, 1e-4, None, torch.device("cpu"), torch.float32)
    hidden, added = unet_conditioning(dict(zip(("input_ids", "input_ids_2"), _ids(parts, ["a red circle"]))), encoders,
                                      add_time_ids((64, 64), (0, 0), (64, 64))[None])
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    denoising_loss(parts.unet, parts.noise_scheduler, latents, hidden, noise, torch.tensor([500]), **added).backward()
    trained = {name: p for name, p in encoders.named_parameters() if p.requires_grad}
    assert {p for p in trained.values()} == set(groups[1]["params"])
    assert any(".layers.31." in name for name in trained) and not any(".layers.11." in name for name in trained if name.startswith("text_encoder."))
    assert [name for name, p in trained.items() if p.grad is None] == []  # (lora_A's is 0 while lora_B starts at 0)
