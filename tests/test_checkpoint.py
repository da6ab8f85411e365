"""Single-file LDM checkpoints: key maps cover every tensor, round trips are bit-exact, an independent reader agrees."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.export import ldm_keys
from sdtune.export.checkpoint import base_config, build_models, configs_from_shapes, ldm_tensors, read_checkpoint, save_checkpoint
from sdtune.models import load_components


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _unet_output(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=gen)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), cond).sample


def _assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def test_round_trip_is_bit_exact_and_covers_every_tensor(reduced, tmp_path):
    version, unet, vae, text_encoder = reduced
    files = save_checkpoint(
        tmp_path / "m.safetensors", unet, vae, text_encoder, version=version,
        prediction_type="epsilon", zero_terminal_snr=False, dtype=torch.float32,
    )
    assert files == [tmp_path / "m.safetensors"]  # epsilon: no sidecars, no markers
    written = load_file(files[0])
    # Nothing but the LDM components (rule 5).
    prefixes = (ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, ldm_keys.CLIP_PREFIX if version == "sd_v1" else ldm_keys.OPENCLIP_PREFIX)
    assert all(k.startswith(prefixes) for k in written)
    n_te = sum(k.startswith("cond_stage_model.") for k in written)
    if version == "sd_v2":
        # 24 resblocks of 12 tensors, 4 embedding/final-norm tensors, text_projection, logit_scale; diffusers runs 23.
        assert n_te == 24 * 12 + 4 + 2 and "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in written
        assert written["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
        assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in written
    else:
        assert n_te == len(text_encoder.state_dict())
    assert written["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    assert sum(k.startswith(ldm_keys.UNET_PREFIX) for k in written) == len(unet.state_dict())
    assert sum(k.startswith(ldm_keys.VAE_PREFIX) for k in written) == len(vae.state_dict())

    checkpoint = read_checkpoint(files[0])
    assert checkpoint.version == version and checkpoint.ignored == []
    assert checkpoint.prediction_type == "epsilon" and checkpoint.zero_terminal_snr is False
    assert len(checkpoint.extras) == (14 if version == "sd_v2" else 0)
    unet2, vae2, text_encoder2 = build_models(checkpoint)
    for a, b in ((unet, unet2), (vae, vae2), (text_encoder, text_encoder2)):
        _assert_same_tensors(a, b)
    assert _public(unet2.config) == _public(unet.config)
    assert _public(vae2.config) == _public(vae.config)
    assert text_encoder2.config.to_dict() == text_encoder.config.to_dict()
    torch.testing.assert_close(_unet_output(unet2), _unet_output(unet), rtol=0, atol=1e-5)  # same tensors; kernels may differ in the last bits

    # Written again from what was read: the carried SD 2 extras come back unchanged, so the file is identical.
    again = save_checkpoint(
        tmp_path / "again.safetensors", unet2, vae2, text_encoder2, version=version,
        prediction_type="epsilon", zero_terminal_snr=False, dtype=torch.float32, extras=checkpoint.extras,
    )
    rewritten = load_file(again[0])
    assert rewritten.keys() == written.keys() and all(torch.equal(rewritten[k], written[k]) for k in written)


def test_shapes_alone_give_the_architecture(reduced, tmp_path):
    """A file without our metadata (as other tools write it) reads back the same models."""
    version, unet, vae, text_encoder = reduced
    tensors = ldm_tensors(unet, vae, text_encoder, version, torch.float32)
    save_file(tensors, tmp_path / "plain.safetensors")
    checkpoint = read_checkpoint(tmp_path / "plain.safetensors")
    assert checkpoint.prediction_type is None and checkpoint.zero_terminal_snr is None
    unet2, vae2, text_encoder2 = build_models(checkpoint)
    torch.testing.assert_close(_unet_output(unet2), _unet_output(unet), rtol=0, atol=1e-5)  # same tensors; kernels may differ in the last bits
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        torch.testing.assert_close(text_encoder2(ids)[0], text_encoder(ids)[0], rtol=0, atol=1e-5)


def test_sd2_file_without_the_unused_openclip_block(tmp_path):
    """diffusers' converter writes 23 resblocks and no text_projection or logit_scale: all 23 are
    used, and a file written from it gets the 24th back (identity), as the UIs expect 24."""
    from sdtune.tiny import reduced_sd

    unet, vae, text_encoder = reduced_sd("sd_v2")
    tensors = ldm_tensors(unet, vae, text_encoder, "sd_v2", torch.float32)
    short = {k: v for k, v in tensors.items() if ".resblocks.23." not in k and not k.endswith(("text_projection", "logit_scale"))}
    save_file(short, tmp_path / "short.safetensors")
    checkpoint = read_checkpoint(tmp_path / "short.safetensors")
    assert checkpoint.configs["text_encoder"]["num_hidden_layers"] == 23 and checkpoint.extras == {}
    text_encoder2 = build_models(checkpoint)[2]
    _assert_same_tensors(text_encoder2, text_encoder)
    rewritten = ldm_tensors(unet, vae, text_encoder2, "sd_v2", torch.float32, extras=checkpoint.extras)
    assert rewritten.keys() == tensors.keys()


@pytest.mark.parametrize("version", ["sd_v1", "sd_v2"])
def test_detection_at_full_size(version):
    """The real SD 1.5 / 2.1 models (built on the meta device: shapes only) are detected as themselves."""
    configs = base_config(version)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    layout = ldm_keys.unet_layout(unet.config)
    shapes = ldm_keys.unet_to_ldm(unet.state_dict(), layout) | ldm_keys.vae_to_ldm(vae.state_dict(), 4, 2)
    if version == "sd_v1":
        shapes |= ldm_keys.clip_to_ldm(text_encoder.state_dict())
    else:
        shapes |= ldm_keys.openclip_to_ldm(text_encoder.state_dict(), 23) | ldm_keys.openclip_extras(23, 1024, 4096, torch.float16)
    assert sum(k.startswith(ldm_keys.UNET_PREFIX) for k in shapes) == 686  # every UNet tensor of SD 1.5 / 2.1
    assert sum(k.startswith(ldm_keys.VAE_PREFIX) for k in shapes) == 248
    detected = configs_from_shapes(version, {k: tuple(v.shape) for k, v in shapes.items()}, "v_prediction" if version == "sd_v2" else "epsilon")
    for part in ("vae", "text_encoder"):
        assert detected[part] == configs[part], part
    assert {k: v for k, v in detected["unet"].items() if k != "transformer_layers_per_block"} == configs["unet"]
    if version == "sd_v2":
        assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)


def test_diffusers_from_single_file_reads_our_file(reduced, tmp_path):
    """An independent reader: diffusers' own LDM converter, given a local config (no hub)."""
    version, unet, vae, text_encoder = reduced
    path = save_checkpoint(
        tmp_path / "m.safetensors", unet, vae, text_encoder, version=version,
        prediction_type="v_prediction", zero_terminal_snr=False, dtype=torch.float32,
    )[0]
    unet.save_config(tmp_path / "unet")
    vae.save_config(tmp_path / "vae")
    theirs = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path / "unet"), local_files_only=True)
    torch.testing.assert_close(_unet_output(theirs), _unet_output(unet), rtol=0, atol=1e-5)
    their_vae = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "vae"), local_files_only=True)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(their_vae(image).sample, vae(image).sample, rtol=0, atol=1e-5)

    # Text encoder: diffusers' LDM CLIP / OpenCLIP converters give back our tensors.
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    written = load_file(path)
    if version == "sd_v1":
        theirs = convert_ldm_clip_checkpoint(written)
    else:
        theirs = convert_open_clip_checkpoint(text_encoder, written)
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    ours = text_encoder.state_dict()
    # diffusers keeps OpenCLIP's unused 24th block and the projection; the 23-layer encoder has neither.
    theirs = {k: v for k, v in theirs.items() if k in ours or ("layers.23." not in k and "text_projection" not in k)}
    assert theirs.keys() == ours.keys(), set(theirs) ^ set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_v_prediction_markers_and_sidecars(tmp_path):
    from sdtune.tiny import reduced_sd

    unet, vae, text_encoder = reduced_sd("sd_v2")
    files = save_checkpoint(
        tmp_path / "vmodel.safetensors", unet, vae, text_encoder, version="sd_v2",
        prediction_type="v_prediction", zero_terminal_snr=True, title="my model",
    )
    assert [f.name for f in files] == ["vmodel.safetensors", "vmodel.yaml", "vmodel.comfyui.json"]
    with safe_open(str(files[0]), framework="pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("v_pred").numel() == 0 and handle.get_tensor("ztsnr").numel() == 0
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16  # fp16 default
    assert metadata["modelspec.prediction_type"] == "v" and metadata["sdtune.zero_terminal_snr"] == "True"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v" and metadata["modelspec.title"] == "my model"
    config = yaml.safe_load(files[1].read_text())["model"]["params"]
    assert config["parameterization"] == "v"
    assert config["cond_stage_config"]["params"]["layer"] == "penultimate"
    assert config["unet_config"]["params"]["use_linear_in_transformer"] is True
    assert config["unet_config"]["params"]["context_dim"] == 32
    nodes = json.loads(files[2].read_text())
    sampling = next(n for n in nodes.values() if n["class_type"] == "ModelSamplingDiscrete")["inputs"]
    assert (sampling["sampling"], sampling["zsnr"]) == ("v_prediction", True)
    assert next(n for n in nodes.values() if n["class_type"] == "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == "vmodel.safetensors"

    # Loading it as a base model: markers set the expectations, the tokenizer is SD 2's.
    parts = load_components(files[0], "v_prediction", zero_terminal_snr=True)
    assert parts.base_model_version == "sd_v2" and parts.tokenizer.pad_token == "!" and parts.tokenizer.pad_token_id == 0
    assert parts.noise_scheduler.config.prediction_type == "v_prediction" and len(parts.ldm_extras) == 14
    with pytest.raises(ValueError, match="set model.prediction_type: v_prediction"):
        load_components(files[0], "epsilon", zero_terminal_snr=False)


def test_sd2_files_carry_logit_scale(tmp_path):
    """SD 2.1's file has OpenCLIP's logit_scale, which A1111's loader fills: written from a diffusers
    model it is CLIP's trained ln(100); read from a file, the file's own value goes back unchanged."""
    import math

    from sdtune.tiny import reduced_sd

    key = "cond_stage_model.model.logit_scale"
    unet, vae, text_encoder = reduced_sd("sd_v2")
    tensors = ldm_tensors(unet, vae, text_encoder, "sd_v2", torch.float32)
    assert tensors[key].shape == () and tensors[key].item() == pytest.approx(math.log(100.0))
    tensors[key] = torch.tensor(4.25)  # a base model's own value
    save_file(tensors, tmp_path / "base.safetensors")
    checkpoint = read_checkpoint(tmp_path / "base.safetensors")
    assert checkpoint.extras[key].item() == 4.25
    rewritten = ldm_tensors(*build_models(checkpoint), "sd_v2", torch.float32, extras=checkpoint.extras)
    assert rewritten[key].item() == 4.25 and rewritten.keys() == tensors.keys()
    # The SD 1 text encoder (CLIP ViT-L in transformers names) has no such tensor.
    assert not any(k.endswith("logit_scale") for k in ldm_tensors(*reduced_sd("sd_v1"), "sd_v1", torch.float32))


def test_sd1_v_prediction_sidecar_is_v1_inference_with_v():
    from sdtune.export.sidecars import a1111_yaml

    configs = base_config("sd_v1")
    params = yaml.safe_load(a1111_yaml("sd_v1", configs["unet"], configs["vae"], "v_prediction"))["model"]["params"]
    assert params["parameterization"] == "v"
    assert params["cond_stage_config"] == {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    unet = params["unet_config"]["params"]
    assert (unet["model_channels"], unet["channel_mult"], unet["attention_resolutions"], unet["num_heads"]) == (320, [1, 2, 4, 4], [4, 2, 1], 8)
    assert params["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2, 4, 4]
    configs = base_config("sd_v2")
    unet = yaml.safe_load(a1111_yaml("sd_v2", configs["unet"], configs["vae"], "v_prediction"))["model"]["params"]["unet_config"]["params"]
    assert unet["num_head_channels"] == 64 and "num_heads" not in unet


def test_pickles_only_when_allowed(tmp_path):
    from sdtune.tiny import reduced_sd

    unet, vae, text_encoder = reduced_sd("sd_v1")
    tensors = ldm_tensors(unet, vae, text_encoder, "sd_v1", torch.float32)
    torch.save({"state_dict": tensors | {"model_ema.decay": torch.tensor(0.9999)}}, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="model.allow_pickle: true"):
        read_checkpoint(tmp_path / "m.ckpt")
    checkpoint = read_checkpoint(tmp_path / "m.ckpt", allow_pickle=True)
    assert checkpoint.ignored == ["model_ema.decay"]
    _assert_same_tensors(build_models(checkpoint)[0], unet)


def test_a_lora_file_is_not_a_checkpoint(tmp_path):
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="sdtune inspect"):
        read_checkpoint(tmp_path / "lora.safetensors")
