"""Training end to end on the tiny model: loss falls, the cache is reused, the LoRA file reproduces the model."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextModel

from sdtune.adapters import add_lora, trainable_parameters
from sdtune.export.kohya import merge_lora, read_lora
from sdtune.models import load_components
from sdtune.errors import UserError
from sdtune.recipe import RecipeError, load_recipe
from sdtune.train import main, train


def _args(model, data, tmp_path, *extra):
    return [
        "--recipe", "recipes/tiny_demo.yaml",
        "--set", f"model.path={model}",
        "--set", f"data.path={data}",
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", f"output.dir={tmp_path / 'out'}",
        "--set", "train.logger=none",
        # The demo recipe's previews and held-out images are off unless a test asks.
        "--set", "preview.prompts=[]",
        "--set", "data.validation_split=0",
        *[item for pair in (("--set", e) for e in extra) for item in pair],
    ]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unet_output(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), cond).sample


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 1e-4)])
def test_loss_falls_on_a_fixed_batch(tiny_v, method, lr):
    """40 AdamW steps on one fixed batch (fixed noise and timesteps), a rank-8 LoRA
    or every UNet weight: the v-prediction loss must fall by at least 30%."""
    torch.manual_seed(0)
    parts = load_components(tiny_v, "v_prediction", zero_terminal_snr=True)
    unet = parts.unet
    if method == "lora":
        add_lora(unet, rank=8, alpha=8, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=lr)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    cond = torch.randn(4, 77, 32, generator=gen)
    timesteps = torch.tensor([100, 400, 700, 950])

    from sdtune.diffusion import Objective, denoising_loss

    losses = []
    for _ in range(40):
        loss = denoising_loss(unet, parts.noise_scheduler, latents, cond, noise, timesteps, Objective(min_snr_gamma=5.0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_lora_run_writes_a_kohya_file_that_reproduces_the_model(tiny_v, small_dataset, tmp_path):
    result = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=12", "export.dtype=fp32", "lora.alpha=4"))
    assert len(result.losses) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.output == tmp_path / "out" / "tiny-demo.safetensors"
    # A normal file mode (safetensors alone writes 0600, unreadable to a UI running as another user).
    assert stat.S_IMODE(result.output.stat().st_mode) == 0o666 & ~_umask()
    tensors, metadata = read_lora(result.output)

    # Keys: kohya names only, three per adapted layer, alpha = the trained alpha (not the rank).
    layers = {k.split(".", 1)[0] for k in tensors}
    assert len(layers) == 56 and all(name.startswith("lora_unet_") for name in layers)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in layers
    assert len(tensors) == 3 * len(layers)
    assert all(tensors[f"{n}.alpha"].item() == 4.0 and tensors[f"{n}.lora_down.weight"].shape[0] == 8 for n in layers)

    # Metadata: what the UIs read, and how the file was made.
    assert metadata["ss_v2"] == "False" and metadata["ss_base_model_version"] == "sd_v1"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "4.0")
    assert metadata["modelspec.prediction_type"] == "v" and metadata["sdtune.zero_terminal_snr"] == "True"
    assert metadata["ss_steps"] == "12" and len(metadata["ss_new_sd_model_hash"]) == 64
    assert json.loads(metadata["sdtune.recipe"])["lora"]["alpha"] == 4.0
    assert load_recipe(tmp_path / "out" / "tiny-demo.recipe.yaml").lora.alpha == 4.0

    # A fresh base UNet plus the file, merged by the UIs' rule, gives the trained UNet's output.
    trained = _unet_output(result.unet)
    base = UNet2DConditionModel.from_pretrained(tiny_v, subfolder="unet")
    untouched = _unet_output(base)
    merge_lora(tensors, base)
    merged = _unet_output(base)
    assert (trained - untouched).abs().max() > 1e-3  # the LoRA did something
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-5)


def test_exported_lora_loads_in_diffusers_kohya_loader(tiny_v, small_dataset, tmp_path):
    """An independent reader: diffusers' own kohya-format converter finds every key and
    applies the file's alpha (4, not the rank 8: a reader that took the rank would
    apply twice the update)."""
    from diffusers import StableDiffusionPipeline

    result = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=6", "lora.alpha=4", "train.learning_rate=1e-2"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_v, safety_checker=None)
    base = _unet_output(pipe.unet)
    pipe.load_lora_weights(str(result.output), adapter_name="sdtune")
    loaded = _unet_output(pipe.unet)
    trained = _unet_output(result.unet)
    # fp16 export (the default): agreement to half precision, far closer than the
    # LoRA's own effect (which a wrong alpha would double).
    torch.testing.assert_close(loaded, trained, rtol=0, atol=2e-3)
    assert (loaded - trained).abs().max() < 0.1 * (trained - base).abs().max()


def test_lora_goes_in_through_peft_not_the_version_gated_mixins(tiny_v, monkeypatch):
    """transformers 5.25's ``add_adapter`` refused every peft release that existed;
    with both libraries' mixins gated shut, sdtune still adapts both models."""
    from diffusers.loaders.peft import PeftAdapterMixin as DiffusersMixin
    from transformers.integrations.peft import PeftAdapterMixin as TransformersMixin

    from sdtune.adapters import lora_layers

    def gate(*args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 99.0")

    monkeypatch.setattr(DiffusersMixin, "add_adapter", gate)
    monkeypatch.setattr(TransformersMixin, "add_adapter", gate)
    parts = load_components(tiny_v, "v_prediction", zero_terminal_snr=False)
    add_lora(parts.unet, 4, 4, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    add_lora(parts.text_encoder, 4, 4, 0.0, ["q_proj", "k_proj", "v_proj", "out_proj"])
    assert len(lora_layers(parts.unet)) == 56 and len(lora_layers(parts.text_encoder)) == 8
    assert trainable_parameters(parts.text_encoder) and all("lora_" in n for n, p in parts.text_encoder.named_parameters() if p.requires_grad)


def test_text_encoder_lora_exports_ui_names(tiny_v, small_dataset, tmp_path):
    result = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=4", "lora.text_encoder=true", "export.dtype=fp32"))
    assert result.text_cache is None  # the text encoder trains, so nothing is cached for it
    tensors, metadata = read_lora(result.output)
    te = sorted({k.split(".", 1)[0] for k in tensors if k.startswith("lora_te_")})
    # transformers >= 5 drops `text_model.` from module paths; the UIs need it.
    assert te == [
        f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(2) for p in ("k_proj", "out_proj", "q_proj", "v_proj")
    ]
    assert metadata["ss_network_train_unet_only"] == "False"
    text_encoder = CLIPTextModel.from_pretrained(tiny_v, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(tiny_v, subfolder="unet")
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        base = text_encoder(ids)[0]
        merge_lora(tensors, unet, text_encoder)
        trained = result.text_encoder(ids)[0]
        assert (trained - base).abs().max() > 1e-4  # the text-encoder LoRA trained
        torch.testing.assert_close(text_encoder(ids)[0], trained, rtol=0, atol=1e-5)


def test_second_run_encodes_nothing_and_a_changed_image_only_itself(tiny_v, small_dataset, tmp_path):
    first = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2"))
    assert (first.latent_cache.encoded, first.latent_cache.reused) == (8, 0)
    assert first.text_cache.encoded == 9  # 8 captions + the empty one for caption dropout

    again = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "output.name=second", "lora.rank=4"))
    assert (again.latent_cache.encoded, again.latent_cache.reused) == (0, 8)
    assert (again.text_cache.encoded, again.text_cache.reused) == (0, 9)

    image = sorted(small_dataset.glob("*.png"))[0]
    with Image.open(image) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    changed = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "output.name=third"))
    assert (changed.latent_cache.encoded, changed.latent_cache.reused) == (1, 7)
    other_resolution = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "output.name=fourth", "data.resolution=72", "data.bucket_step=8"))
    assert other_resolution.latent_cache.encoded == 8


def test_existing_outputs_are_not_overwritten(tiny_v, small_dataset, tmp_path):
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1"))
    with pytest.raises(UserError, match="output.overwrite: true"):
        main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1", "output.overwrite=false"))


def test_full_finetune_writes_a_single_file_and_a_diffusers_folder(tiny_eps, small_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtune.export.checkpoint import build_models, read_checkpoint

    recipe = load_recipe(
        "recipes/full_finetune.yaml",
        [
            f"model.path={tiny_eps}", f"data.path={small_dataset}", f"data.cache_dir={tmp_path / 'cache'}",
            f"output.dir={tmp_path / 'out'}", "data.resolution=64", "train.max_steps=3", "train.batch_size=4",
            "train.mixed_precision=no", "train.optimizer=adamw", "train.learning_rate=1e-4", "train.logger=none",
            "train.gradient_checkpointing=false", "train.lr_warmup_steps=0", "data.num_workers=0",
            "export.formats=[single_file, diffusers]",
        ],
    )
    result = train(recipe)
    assert result.output == tmp_path / "out" / "my-finetune.safetensors"
    checkpoint = read_checkpoint(result.output)
    assert checkpoint.prediction_type == "epsilon" and json.loads(checkpoint.metadata["sdtune.recipe"])["train"]["method"] == "full"
    assert not (tmp_path / "out" / "my-finetune.yaml").exists()  # epsilon: no A1111 sidecar needed
    single_unet = build_models(checkpoint, torch.float16)[0]
    folder = tmp_path / "out" / "my-finetune"
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [result.output, *folder.rglob("*")] if p.is_file()}
    assert modes == {0o666 & ~_umask()}
    with safe_open(str(folder / "unet/diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}  # export.dtype
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, dtype=torch.float16)
    # Both formats hold the same fp16 UNet.
    assert all(torch.equal(a, b) for a, b in zip(single_unet.state_dict().values(), pipe.unet.state_dict().values()))
    assert pipe.scheduler.config.prediction_type == "epsilon"
    base = UNet2DConditionModel.from_pretrained(tiny_eps, subfolder="unet")
    changed = [
        name for name, p in pipe.unet.named_parameters() if not torch.equal(p.float(), base.state_dict()[name].half().float())
    ]
    assert len(changed) > 0.9 * len(list(base.parameters()))


def test_adamw8bit_keeps_8bit_state_on_cpu(tiny_eps, small_dataset, tmp_path, loss_inputs):
    """A full fine-tune (bitsandbytes quantizes the state of tensors of 4096+ elements;
    a tiny LoRA's are all smaller): the big weights' Adam moments are uint8, and the
    weights move."""
    pytest.importorskip("bitsandbytes")
    result = main([
        "--recipe", "recipes/full_finetune.yaml",
        *[a for item in (
            f"model.path={tiny_eps}", f"data.path={small_dataset}", f"data.cache_dir={tmp_path / 'cache'}",
            f"output.dir={tmp_path / 'out'}", "data.resolution=64", "train.max_steps=2", "train.mixed_precision=no",
            "train.logger=none", "train.gradient_checkpointing=false", "train.lr_warmup_steps=0", "train.learning_rate=1e-4",
            "train.optimizer=adamw8bit", "export.dtype=fp32",
        ) for a in ("--set", item)],
    ])
    (optimizer,) = loss_inputs[1]
    assert type(optimizer).__name__ == "AdamW8bit"
    big = [p for p in result.unet.parameters() if p.numel() >= 4096]
    assert big and all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in big)
    base = UNet2DConditionModel.from_pretrained(tiny_eps, subfolder="unet").state_dict()
    assert all(not torch.equal(p, base[n]) for n, p in result.unet.named_parameters() if p.numel() >= 4096)


def test_same_seed_same_lora_and_accumulation_counts_optimizer_steps(tiny_v, small_dataset, tmp_path):
    a = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "output.name=a", "train.batch_size=2", "train.gradient_accumulation_steps=2"))
    b = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "output.name=b", "train.batch_size=2", "train.gradient_accumulation_steps=2"))
    assert len(a.losses) == 6  # 3 optimizer steps x 2 micro-batches
    (ta, ma), (tb, _) = read_lora(a.output), read_lora(b.output)
    assert ma["ss_steps"] == "3"
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    c = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "output.name=c", "train.seed=7", "train.batch_size=2", "train.gradient_accumulation_steps=2"))
    tc, _ = read_lora(c.output)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_bf16_keeps_trainable_weights_fp32(tiny_v, small_dataset, tmp_path):
    result = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "train.mixed_precision=bf16"))
    dtypes = {(("lora_" in name), p.dtype) for name, p in result.unet.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("compile_backend, precision, refused", [
    ("inductor", "bf16", True), (True, "bf16", True), ("aot_eager", "bf16", False), ("inductor", "no", False), (False, "bf16", False),
])
def test_inductor_with_bf16_is_refused_on_cpu(tmp_path, compile_backend, precision, refused):
    # torch 2.13's CPU inductor under bf16 autocast left 32 of the tiny UNet's 56 LoRA-B
    # weights without a gradient (docs/benchmarks.md); aot_eager and fp32 inductor kept them.
    from sdtune.compute import make_accelerator

    if refused:
        with pytest.raises(UserError, match=r"train\.compile: inductor with train\.mixed_precision: bf16 on a CPU") as info:
            make_accelerator(precision, 1, "none", tmp_path, 0, False, compile_backend)
        assert "train.compile: false" in str(info.value) and "train.mixed_precision: no" in str(info.value)
    else:
        assert make_accelerator(precision, 1, "none", tmp_path, 0, False, compile_backend).mixed_precision == precision


def test_inductor_with_bf16_stops_the_run_before_any_work(tiny_v, small_dataset, tmp_path):
    with pytest.raises(UserError, match="drops the gradients of most LoRA layers"):
        main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1", "train.mixed_precision=bf16", "train.compile=inductor"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [False, True])
def test_adapter_layers_no_gradient_reaches_are_named_at_step_one(tiny_v, small_dataset, tmp_path, monkeypatch, capsys, cut):
    # A layer cut off from the loss (here by a hook that detaches its output, as a faulty
    # compiler did: docs/benchmarks.md) is named when the first step is taken, not only when
    # the exported file turns out unchanged.
    import sdtune.train as train_module
    from peft.tuners.tuners_utils import BaseTunerLayer

    real, cut_names = train_module.make_trainable, []

    def make_trainable(unet, *args, **kwargs):
        groups = real(unet, *args, **kwargs)
        if cut:
            name, layer = next((n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer))
            layer.register_forward_hook(lambda module, inputs, output: output.detach())
            cut_names.append(name)
        return groups

    monkeypatch.setattr(train_module, "make_trainable", make_trainable)
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2"))
    err = capsys.readouterr().err
    if cut:
        assert f"1 of 56 adapter layers got no gradient in step 1, so training cannot change them, e.g. {cut_names[0]}." in err
        assert "1 of 56 LoRA layers change nothing" in err  # and the end-of-run check of the file agrees
    else:
        assert "no gradient" not in err


def test_images_without_captions_are_listed_before_any_work(tiny_v, small_dataset, tmp_path):
    for caption in sorted(small_dataset.glob("*.txt"))[:2]:
        caption.unlink()
    with pytest.raises(ValueError, match=r"2 image\(s\) in .* have no caption file") as info:
        main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1"))
    assert "000.png" in str(info.value) and "001.png" in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_xformers_request_fails_clearly_on_cpu(tiny_v, small_dataset, tmp_path):
    with pytest.raises(UserError, match="xformers"):
        main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=1", "train.attention=xformers"))


def test_sdtune_train_cli(tiny_v, small_dataset, tmp_path, capsys):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "sdtune.cli", "train", *_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2")],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "tiny-demo.safetensors").is_file()
    from sdtune.cli import main as cli_main

    assert cli_main(["train", "--recipe", "recipes/tiny_demo.yaml", "--set", "train.lerning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'?" in err and "Traceback" not in err


def test_ema_export_follows_the_decay_formula(tiny_v, small_dataset, tmp_path):
    """Raw weights after steps 1..3 come from three seeded runs (same trajectory);
    the EMA run must export diffusers EMAModel's average of them:
    decay_k = min(decay, (1 + s)/(10 + s)), s = k - 1, so 0, 2/11, 3/12."""
    raw = []
    for steps in (1, 2, 3):
        result = main(_args(tiny_v, small_dataset, tmp_path, f"train.max_steps={steps}", f"output.name=raw{steps}", "export.dtype=fp32", "train.batch_size=2"))
        raw.append(read_lora(result.output)[0])
    ema_run = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "output.name=ema", "export.dtype=fp32", "train.batch_size=2", "ema.enabled=true", "ema.decay=0.9"))
    ema, _ = read_lora(ema_run.output)
    key = next(k for k in ema if k.endswith("lora_up.weight"))
    expected = raw[0][key]
    for decay, weights in ((2 / 11, raw[1]), (3 / 12, raw[2])):
        expected = decay * expected + (1 - decay) * weights[key]
    torch.testing.assert_close(ema[key], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ema[key], raw[2][key])


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_never_writes_weights(tiny_v, small_dataset, tmp_path, policy):
    with pytest.raises(FloatingPointError, match="non-finite|nothing was written") as info:
        main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=60", "train.learning_rate=10", "train.max_grad_norm=0", f"train.on_nan={policy}", "lora.alpha=8", "train.lr_warmup_steps=0"))
    assert "learning_rate" in str(info.value)
    assert not (tmp_path / "out" / "tiny-demo.safetensors").exists()


@pytest.fixture
def loss_inputs(monkeypatch):
    """What reaches the loss at every micro-batch of a run (the trainer's own
    denoising_loss, recorded on the way in), and the optimizers it built."""
    import sdtune.loop as loop
    import sdtune.train as trainer

    seen, optimizers = [], []
    real_loss, real_optimizer = loop.denoising_loss, trainer.make_optimizer

    def record(unet, scheduler, latents, conditioning, noise, timesteps, objective, input_noise=None, **kwargs):
        seen.append({
            "conditioning": conditioning.detach().clone(), "noise": noise.detach().clone(), "timesteps": timesteps.clone(),
            "objective": objective, "input_noise": None if input_noise is None else input_noise.detach().clone(),
            "lr": optimizers[-1].param_groups[0]["lr"],
        })
        return real_loss(unet, scheduler, latents, conditioning, noise, timesteps, objective, input_noise, **kwargs)

    def make_optimizer(*args, **kwargs):
        optimizers.append(real_optimizer(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(loop, "denoising_loss", record)
    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    return seen, optimizers


def _recorded(loss_inputs, key):
    return torch.cat([entry[key] for entry in loss_inputs[0]])


OPTION_RUN = ("train.max_steps=10", "data.caption_dropout=0", "train.lr_warmup_steps=0")


def test_timestep_range_and_logit_normal_reach_the_loss(tiny_v, small_dataset, tmp_path, loss_inputs):
    main(_args(tiny_v, small_dataset, tmp_path, *OPTION_RUN, "output.name=plain"))
    plain = _recorded(loss_inputs, "timesteps").float()
    loss_inputs[0].clear()
    main(_args(tiny_v, small_dataset, tmp_path, *OPTION_RUN, "train.timestep_sampling=logit_normal", "train.logit_mean=0.3",
               "train.min_timestep=100", "train.max_timestep=900"))
    shaped = _recorded(loss_inputs, "timesteps").float()
    assert len(shaped) == len(plain) == 80
    assert shaped.min() >= 100 and shaped.max() < 900
    assert plain.min() < 100 and plain.max() >= 900  # without the range, the whole schedule is drawn
    # Logit-normal(0.3, 1) over [100, 900): the logits have std ~1; uniform ones have pi/sqrt(3) ~ 1.8.
    logit = torch.logit((shaped - 100 + 0.5) / 800)
    assert logit.std() < 1.3 and 0.0 < logit.mean() < 0.6
    assert torch.logit((plain + 0.5) / 1000).std() > 1.5


def test_noise_offset_and_input_perturbation_reach_the_loss(tiny_v, small_dataset, tmp_path, loss_inputs):
    main(_args(tiny_v, small_dataset, tmp_path, *OPTION_RUN, "output.name=plain"))
    plain = loss_inputs[0][:]
    assert all(entry["input_noise"] is None for entry in plain)
    loss_inputs[0].clear()
    main(_args(tiny_v, small_dataset, tmp_path, *OPTION_RUN, "train.noise_offset=0.5", "train.noise_offset_random_strength=true",
               "train.input_perturbation=0.1"))
    # Per-(sample, channel) means of 8x8 noise: std 1/8 plain; the offset (strength uniform in [0, 0.5]) adds ~0.29.
    plain_means = torch.cat([e["noise"] for e in plain]).mean(dim=(2, 3))
    offset_means = _recorded(loss_inputs, "noise").mean(dim=(2, 3))
    assert plain_means.std() < 0.16 < 0.22 < offset_means.std()
    # x_t is made from perturbed noise; the target keeps the clean noise (tested in test_diffusion.py).
    perturbation = _recorded(loss_inputs, "input_noise") - _recorded(loss_inputs, "noise")
    assert 0.09 < perturbation.std() < 0.11


def test_caption_dropout_reaches_the_loss(tiny_v, small_dataset, tmp_path, loss_inputs):
    from sdtune.data.captions import tokenize
    from sdtune.models import encode_prompts

    parts = load_components(tiny_v, "v_prediction", zero_terminal_snr=True)
    with torch.no_grad():
        empty = encode_prompts(parts.text_encoder, tokenize(parts.tokenizer, [""]))[0]

    def empty_fraction() -> float:
        conditioning = _recorded(loss_inputs, "conditioning")
        return sum(torch.allclose(row, empty, atol=1e-5) for row in conditioning) / len(conditioning)

    main(_args(tiny_v, small_dataset, tmp_path, *OPTION_RUN, "output.name=plain"))
    assert empty_fraction() == 0
    loss_inputs[0].clear()
    main(_args(tiny_v, small_dataset, tmp_path, *OPTION_RUN, "data.caption_dropout=0.5"))
    assert 0.3 < empty_fraction() < 0.7  # 80 samples at p = 0.5


def test_loss_type_and_weighting_reach_the_loss(tiny_v, small_dataset, tmp_path, loss_inputs):
    from sdtune.diffusion import Objective

    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "output.name=plain"))
    assert {e["objective"] for e in loss_inputs[0]} == {Objective(min_snr_gamma=5.0)}  # the demo recipe's
    loss_inputs[0].clear()
    main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "train.loss_type=huber", "train.huber_c=0.05",
               "train.min_snr_gamma=null", "train.debiased_estimation=true"))
    assert {e["objective"] for e in loss_inputs[0]} == {Objective(None, True, "huber", 0.05)}


@pytest.mark.parametrize(
    "options,optimizer,rising_then_falling",
    [
        (["train.optimizer=adafactor", "train.lr_scheduler=one_cycle", "train.lr_warmup_steps=2", "train.max_steps=6"], "Adafactor", True),
        (["train.optimizer=prodigy", "train.learning_rate=1.0", "train.lr_scheduler=cosine_with_restarts", "train.lr_num_cycles=2",
          "train.lr_warmup_steps=0", "train.max_steps=6"], "Prodigy", False),
    ],
    ids=["adafactor-one_cycle", "prodigy-cosine_restarts"],
)
def test_optimizer_and_schedule_options_are_the_ones_used(tiny_v, small_dataset, tmp_path, loss_inputs, options, optimizer, rising_then_falling):
    result = main(_args(tiny_v, small_dataset, tmp_path, *options))
    assert [type(o).__name__ for o in loss_inputs[1]] == [optimizer]
    lrs = [e["lr"] for e in loss_inputs[0]]
    assert len(lrs) == 6 and len(set(lrs)) > 2  # the schedule moves the lr every step
    peak = lrs.index(max(lrs))
    if rising_then_falling:  # one-cycle: up over the warm-up, then down
        assert 0 < peak < 5 and lrs[0] < lrs[peak] > lrs[-1]
    else:  # cosine with 2 restarts: falls, jumps back up, falls again
        assert any(b > a for a, b in zip(lrs[1:], lrs[2:])) and lrs[0] == max(lrs)
    tensors, _ = read_lora(result.output)
    assert any(k.endswith("lora_up.weight") and tensors[k].abs().max() > 0 for k in tensors)


def _resume_args(model, data, out, cache, *extra):
    args = ["--recipe", "recipes/tiny_demo.yaml"]
    for item in (
        f"model.path={model}", f"data.path={data}", f"data.cache_dir={cache}", f"output.dir={out}", "train.logger=none",
        "preview.prompts=[]", "data.validation_split=0",
        "export.dtype=fp32", "train.deterministic=true", "train.batch_size=3", "train.gradient_accumulation_steps=2",
        "train.lr_scheduler=cosine", "train.lr_warmup_steps=2", "ema.enabled=true", "ema.decay=0.9", "data.caption_dropout=0.3",
        *extra,
    ):
        args += ["--set", item]
    return args


def test_resume_from_a_checkpoint_is_bit_exact(tiny_v, small_dataset, tmp_path):
    """8 steps straight (checkpoints every 2) vs. resuming the step-2 checkpoint in
    another folder: the same final weights, bit for bit. 8 images in batches of 3
    (3, 3, 2) with accumulation 2 puts step 2 mid-epoch (batch 1 of epoch 1)."""
    import shutil

    cache = tmp_path / "cache"
    straight = main(_resume_args(tiny_v, small_dataset, tmp_path / "a", cache, "train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=5"))
    saved = sorted(p.name for p in (tmp_path / "a" / "checkpoints" / "tiny-demo").iterdir())
    assert saved == ["step-00000002", "step-00000004", "step-00000006"]
    assert (tmp_path / "a" / "tiny-demo-step000002.safetensors").is_file()
    position = json.loads((tmp_path / "a" / "checkpoints" / "tiny-demo" / "step-00000002" / "position.json").read_text())
    assert (position["epoch"], position["batch_in_epoch"]) == (1, 1)

    shutil.copytree(tmp_path / "a" / "checkpoints" / "tiny-demo" / "step-00000002", tmp_path / "b" / "checkpoints" / "tiny-demo" / "step-00000002")
    resumed = main([*_resume_args(tiny_v, small_dataset, tmp_path / "b", cache, "train.max_steps=8", "checkpoint.every_steps=2"), "--resume", "latest"])
    assert resumed.steps == 8 and len(resumed.losses) == 12  # 6 steps x 2 micro-batches
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[4:]), rtol=0, atol=0)
    a, _ = read_lora(straight.output)
    b, _ = read_lora(resumed.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match=r"(?s)differs from the checkpoint's.*train.learning_rate: 0.001 -> 0.5"):
        main([*_resume_args(tiny_v, small_dataset, tmp_path / "b", cache, "train.max_steps=8", "train.learning_rate=0.5"), "--resume", "latest"])
    with pytest.raises(UserError, match="--resume latest"):
        main(_resume_args(tiny_v, small_dataset, tmp_path / "a", cache, "train.max_steps=8", "output.overwrite=false"))


def test_sigterm_saves_state_and_the_resumed_run_matches(tiny_v, small_dataset, tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time

    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "sdtune.cli", "train"]
    args = _resume_args(tiny_v, small_dataset, tmp_path / "run", cache, "train.max_steps=24")
    proc = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()
    def read_progress():
        for chunk in iter(lambda: proc.stderr.read(1), b""):
            seen.extend(chunk)

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not re.search(rb"training: .*\| *[1-9]\d*/24", bytes(seen)) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, stdout + bytes(seen).decode(errors="replace")[-2000:]
    assert "resume with the same command plus --resume latest" in stdout
    stopped_at = int(re.search(r"after step (\d+)", stdout).group(1))
    assert 0 < stopped_at < 24
    assert not (tmp_path / "run" / "tiny-demo.safetensors").exists()  # unfinished: only the checkpoint export
    assert (tmp_path / "run" / f"tiny-demo-step{stopped_at:06d}.safetensors").is_file()

    subprocess.run([*command, *args, "--resume", "latest"], check=True, capture_output=True)
    straight = main(_resume_args(tiny_v, small_dataset, tmp_path / "straight", cache, "train.max_steps=24"))
    a, _ = read_lora(tmp_path / "run" / "tiny-demo.safetensors")
    b, _ = read_lora(straight.output)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_on_a_single_file_base(tiny_v, small_dataset, tmp_path):
    """model.path may be a single-file checkpoint; its v_pred/ztsnr markers must agree with the recipe."""
    from sdtune.export.commands import export_checkpoint

    single = export_checkpoint(tiny_v, tmp_path / "base.safetensors", zero_terminal_snr=True, dtype="fp32")[0]
    result = main(_args(single, small_dataset, tmp_path, "train.max_steps=2"))
    tensors, metadata = read_lora(result.output)
    assert metadata["ss_sd_model_name"] == "base" and len(metadata["ss_new_sd_model_hash"]) == 64
    assert len({k.split(".", 1)[0] for k in tensors}) == 56
    with pytest.raises(ValueError, match="set model.zero_terminal_snr: true"):
        main(_args(single, small_dataset, tmp_path, "train.max_steps=1", "model.zero_terminal_snr=false", "output.name=x"))


def test_lora_presets_locon_conv_rank_and_text_encoder_stop(tiny_v, small_dataset, tmp_path):
    result = main(_args(
        tiny_v, small_dataset, tmp_path, "train.max_steps=4", "lora.preset=locon", "lora.conv_rank=4", "lora.conv_alpha=2",
        "lora.init=gaussian", "lora.text_encoder=true", "train.text_encoder_steps=2", "export.dtype=fp32",
        "checkpoint.every_steps=2",
    ))
    tensors, metadata = read_lora(result.output)
    layers = {k.split(".", 1)[0] for k in tensors}
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert {conv1, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2", "lora_unet_down_blocks_0_downsamplers_0_conv"} <= layers
    assert tensors[f"{conv1}.lora_down.weight"].shape[:1] + tensors[f"{conv1}.lora_down.weight"].shape[2:] == (4, 3, 3)
    assert tensors[f"{conv1}.alpha"].item() == 2.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 8  # linear: lora.rank
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    # The text-encoder LoRA trained for 2 of the 4 steps, then stayed as it was: its
    # weights at the end are those of the step-2 export, while the UNet's moved on.
    te = [k for k in tensors if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te and all(tensors[k].abs().max() > 0 for k in te)
    at_step_2, _ = read_lora(tmp_path / "out" / "tiny-demo-step000002.safetensors")
    assert all(torch.equal(tensors[k], at_step_2[k]) for k in tensors if k.startswith("lora_te_"))
    assert not torch.equal(tensors[f"{conv1}.lora_up.weight"], at_step_2[f"{conv1}.lora_up.weight"])
    # Everything merges back by the UIs' rule (layer names and conv shapes line up).
    merge_lora(tensors, UNet2DConditionModel.from_pretrained(tiny_v, subfolder="unet"), CLIPTextModel.from_pretrained(tiny_v, subfolder="text_encoder"))
    with pytest.raises(RecipeError, match="only with lora.preset: custom"):
        load_recipe("recipes/tiny_demo.yaml", ["lora.target_modules=[to_q]"])


def test_new_lora_trains_on_top_of_a_merged_one(tiny_v, small_dataset, tmp_path):
    first = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=3", "output.name=first", "lora.text_encoder=true", "export.dtype=fp32"))
    second = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", "output.name=second", f"lora.merge_first={first.output}", "export.dtype=fp32"))
    _, metadata = read_lora(second.output)
    assert metadata["sdtune.merged_first"].startswith("first.safetensors sha256=")
    # Its base was the base plus the first LoRA: the text cache was filled again for that text encoder.
    assert second.text_cache.encoded == 9
    base = UNet2DConditionModel.from_pretrained(tiny_v, subfolder="unet")
    merge_lora(read_lora(first.output)[0], base, CLIPTextModel.from_pretrained(tiny_v, subfolder="text_encoder"))
    merge_lora(read_lora(second.output)[0], base)
    torch.testing.assert_close(_unet_output(base), _unet_output(second.unet), rtol=0, atol=1e-5)


def test_validation_loss_is_fixed_for_fixed_weights_and_leaves_training_alone(tiny_v, small_dataset, tmp_path):
    common = ("train.max_steps=4", "data.validation_split=2", "export.dtype=fp32", "validation.every_steps=2", "validation.timesteps=[200, 800]")
    with_val = main(_args(tiny_v, small_dataset, tmp_path, *common, "output.name=a"))
    assert [step for step, _ in with_val.validation] == [2, 4]
    assert all(set(losses) == {200, 800} and all(v > 0 for v in losses.values()) for _, losses in with_val.validation)
    no_val = main(_args(tiny_v, small_dataset, tmp_path, *common, "output.name=b", "validation.every_steps=1000"))
    assert [step for step, _ in no_val.validation] == [4]  # at the end only
    a, _ = read_lora(with_val.output)
    b, _ = read_lora(no_val.output)
    assert all(torch.equal(a[k], b[k]) for k in a)  # validating did not move the training RNG
    # The noise and timesteps are fixed: the same weights score exactly the same in another run.
    assert no_val.validation[-1][1] == with_val.validation[-1][1]
    assert with_val.validation[0][1] != with_val.validation[1][1]  # and the score moves when the model does


def test_previews_and_report_html(tiny_v, small_dataset, tmp_path):
    common = ("train.max_steps=4", "export.dtype=fp32", "data.validation_split=2", "validation.every_steps=2")
    result = main(_args(
        tiny_v, small_dataset, tmp_path, *common, "preview.prompts=[a red circle, a blue square]", "preview.every_steps=2",
        "preview.steps=2", "ema.enabled=true", "train.logger=tensorboard",
    ))
    out = tmp_path / "out"
    grids = sorted((out / "previews" / "tiny-demo").glob("*.png"))
    assert [p.name for p in grids] == ["step-000002.png", "step-000004.png"]
    images = [np.asarray(Image.open(path).convert("RGB")) for path in grids]
    height, width = images[-1].shape[:2]
    # Two 64 px columns (one per prompt) after the row-label strip; three rows (base, LoRA, EMA) under the prompt strip.
    assert 2 * 64 < width <= 2 * 64 + 2 * 64 and 3 * 64 < height < 3 * 64 + 64
    base_row, lora_row = (slice(height - 3 * 64, height - 2 * 64), -2 * 64), (slice(height - 2 * 64, height - 64), -2 * 64)
    # The base row is the model with the LoRA off: the same at every step, while the LoRA's row moves.
    assert np.array_equal(images[0][base_row[0], base_row[1]:], images[1][base_row[0], base_row[1]:])
    assert not np.array_equal(images[0][lora_row[0], lora_row[1]:], images[1][lora_row[0], lora_row[1]:])
    page = (out / "tiny-demo.report.html").read_text()
    assert page.count("<polyline") >= 4  # loss, lr, validation mean and per timestep
    assert "Training loss" in page and "Validation loss" in page and page.count("data:image/png;base64,") == 2
    assert "preview:" in page and "a red circle" in page  # the resolved recipe
    # Previews restore the training RNG: the LoRA is the one trained without them.
    plain = main(_args(tiny_v, small_dataset, tmp_path, *common, "ema.enabled=true", "output.dir=" + str(tmp_path / "plain")))
    a, _ = read_lora(result.output)
    b, _ = read_lora(plain.output)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("previews", [False, True])
def test_frozen_encoders_are_freed_before_step_1_unless_previews_need_them(tiny_v, small_dataset, tmp_path, monkeypatch, previews):
    """With the caches built, a LoRA run without previews drops the VAE and the frozen
    text encoder: at the first step nothing holds them any more."""
    import gc
    import weakref

    import sdtune.loop
    import sdtune.train as train_module

    encoders, alive_at_step_1 = [], []
    original_loss = sdtune.loop.denoising_loss

    def load(*args, **kwargs):
        parts = load_components(*args, **kwargs)
        encoders.extend(weakref.ref(module) for module in (parts.vae, parts.text_encoder))
        return parts

    def loss(*args, **kwargs):
        if not alive_at_step_1:
            gc.collect()
            alive_at_step_1.extend(ref() is not None for ref in encoders)
        return original_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "load_components", load)
    monkeypatch.setattr(sdtune.loop, "denoising_loss", loss)
    extra = ("preview.prompts=[a red circle]", "preview.steps=1", "preview.every_steps=100") if previews else ()
    result = main(_args(tiny_v, small_dataset, tmp_path, "train.max_steps=2", *extra))
    assert alive_at_step_1 == [previews, previews]
    assert (result.text_encoder is not None) == previews
    assert read_lora(result.output)[0]  # the LoRA export needs neither
    assert len(list((tmp_path / "out" / "previews").rglob("*.png"))) == previews


def test_full_finetune_with_the_text_encoder(tiny_eps, small_dataset, tmp_path):
    from sdtune.export.checkpoint import read_checkpoint

    result = main([
        "--recipe", "recipes/full_finetune.yaml",
        *[a for item in (
            f"model.path={tiny_eps}", f"data.path={small_dataset}", f"data.cache_dir={tmp_path / 'cache'}",
            f"output.dir={tmp_path / 'out'}", "data.resolution=64", "train.max_steps=3", "train.batch_size=4",
            "train.mixed_precision=no", "train.optimizer=adamw", "train.logger=none", "train.gradient_checkpointing=false",
            "train.lr_warmup_steps=0", "train.learning_rate=1e-3", "train.full_text_encoder=true", "train.text_encoder_steps=2",
            "export.dtype=fp32", "checkpoint.every_steps=2",
        ) for a in ("--set", item)],
    ])
    assert result.text_cache is None  # the text encoder trains, so nothing is cached for it
    base = CLIPTextModel.from_pretrained(tiny_eps, subfolder="text_encoder").state_dict()
    final = read_checkpoint(result.output)
    changed = [k for k, v in final.text_encoder.items() if k in base and not torch.equal(v, base[k])]
    assert len(changed) > 0.5 * len(base)
    # It stopped after step 2: the final text encoder is the step-2 one, the UNet moved on.
    at_step_2 = read_checkpoint(tmp_path / "out" / "my-finetune-step000002.safetensors")
    assert all(torch.equal(v, at_step_2.text_encoder[k]) for k, v in final.text_encoder.items())
    assert not all(torch.equal(v, at_step_2.unet[k]) for k, v in final.unet.items())
    with pytest.raises(RecipeError, match="needs train.method: full"):
        load_recipe("recipes/tiny_demo.yaml", ["train.full_text_encoder=true"])


def test_the_resume_hint_of_a_resumed_run_says_resume_once(monkeypatch, capsys, tmp_path):
    from sdtune.run_report import print_resume as _print_resume

    for given in (["--resume", "latest"], ["--resume=step-00000004"], []):
        monkeypatch.setattr("sys.argv", ["sdtune/train.py", "--recipe", "r.yaml", *given, "--set", "train.max_steps=8"])
        _print_resume(15, 6, tmp_path / "step-00000006")
        hint = capsys.readouterr().out.splitlines()[-1].split()
        assert hint[1:] == ["sdtune/train.py", "--recipe", "r.yaml", "--set", "train.max_steps=8", "--resume", "latest"]


def test_compile_runs_the_training_steps_through_torch_compile(tiny_v, small_dataset, tmp_path):
    """train.compile hands the loop's UNet to torch.compile (the `eager` backend here: dynamo's
    capture without inductor's minutes of code generation). The steps give the same losses and
    the exported LoRA keeps its layer names (no `_orig_mod`)."""
    from torch._dynamo.utils import counters

    from sdtune.export.kohya import read_lora

    run = ("train.max_steps=3", "train.deterministic=true", "data.caption_dropout=0")
    plain = main(_args(tiny_v, small_dataset, tmp_path, *run, "output.name=plain"))
    torch._dynamo.reset()
    counters.clear()
    compiled = main(_args(tiny_v, small_dataset, tmp_path, *run, "train.compile=eager", "output.name=compiled"))
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the UNet's forward
    torch._dynamo.reset()
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-7)
    a, b = read_lora(plain.output)[0], read_lora(compiled.output)[0]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_closing_line_says_the_peak_gpu_memory_on_cuda_only(monkeypatch):
    from sdtune.run_report import peak_gpu_memory

    assert peak_gpu_memory() is None  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5 * 2**30 + 2**29)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert peak_gpu_memory() == "5.50 GiB (main process, NVIDIA H100 80GB HBM3)"
