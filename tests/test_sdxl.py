"""SDXL single files (SGM layout): the key map covers every tensor of the real topology, files round
trip bit-exact, shapes alone give the architecture, and diffusers' own reader agrees."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdtune.export import ldm_keys, sgm_keys
from sdtune.export.checkpoint import base_config, read_checkpoint
from sdtune.export.sgm_checkpoint import (
    build_sdxl_models, configs_from_sgm_shapes, read_sgm_checkpoint, save_sdxl_checkpoint, sgm_tensors,
)  # fmt: skip
from sdtune.tiny import reduced_sdxl

SDXL = "sdxl_base_v1-0"


@pytest.fixture(scope="module")
def sdxl_models():
    """(unet, vae, text_encoder, text_encoder_2): SDXL 1.0's topology at reduced width, every tensor random."""
    return reduced_sdxl(seed=0)


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    """The UNet on fixed inputs, with SDXL's pooled text embedding and size/crop ids."""
    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    x = torch.randn(1, config.in_channels, 16, 16, generator=gen)
    cond = torch.randn(1, 77, config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(1, pooled, generator=gen), "time_ids": torch.tensor([[128.0, 96.0, 8.0, 0.0, 128.0, 128.0]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), cond, added_cond_kwargs=added).sample


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_full_size_sdxl_key_set_and_detection():
    """The real SDXL 1.0 (built on the meta device: shapes only) maps to the 2515 tensors of
    sd_xl_base_1.0.safetensors (1680 UNet, 248 VAE, 197 CLIP-L, 390 bigG), and its shapes
    give back the shipped configs."""
    configs = base_config(SDXL)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        te1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    shapes = sgm_keys.unet_to_sgm(unet.state_dict(), ldm_keys.unet_layout(unet.config)) | ldm_keys.vae_to_ldm(vae.state_dict(), 4, 2)
    shapes |= sgm_keys.clip_l_to_sgm(te1.state_dict()) | sgm_keys.bigg_to_sgm(te2.state_dict(), 32) | sgm_keys.sgm_extras(77, torch.float16)
    counts = {p: sum(k.startswith(p) for k in shapes) for p in ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.", "conditioner.embedders.1.")}
    assert list(counts.values()) == [1680, 248, 197, 390] and len(shapes) == 2515
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.output_blocks.2.2.conv.weight",
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", sgm_keys.POSITION_IDS,
                sgm_keys.BIGG_LOGIT_SCALE, sgm_keys.BIGG_PROJECTION):  # fmt: skip
        assert key in shapes, key
    assert shapes["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3840, 1280)
    detected = configs_from_sgm_shapes({k: tuple(v.shape) for k, v in shapes.items()})
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert detected[part] == configs[part], part


def test_round_trip_is_bit_exact(sdxl_models, tmp_path):
    unet, vae, te1, te2 = sdxl_models
    files = save_sdxl_checkpoint(tmp_path / "m.safetensors", unet, vae, te1, te2, prediction_type="epsilon", zero_terminal_snr=False, dtype=torch.float32)
    assert files == [tmp_path / "m.safetensors"]  # SDXL needs no sidecars: both UIs read the markers
    written = load_file(files[0])
    prefixes = (ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, sgm_keys.CLIP_L_PREFIX, sgm_keys.BIGG_PREFIX)
    assert all(k.startswith(prefixes) for k in written)  # nothing else: no markers for epsilon, no diffusers names
    assert sum(k.startswith(ldm_keys.UNET_PREFIX) for k in written) == len(unet.state_dict())
    assert sum(k.startswith(sgm_keys.CLIP_L_PREFIX) for k in written) == len(te1.state_dict()) + 1  # + position_ids
    assert sum(k.startswith(sgm_keys.BIGG_PREFIX) for k in written) == 32 * 12 + 4 + 2  # fused q/k/v; projection, logit_scale
    # OpenCLIP applies x @ text_projection: the transpose of transformers' Linear weight.
    assert torch.equal(written[sgm_keys.BIGG_PROJECTION], te2.text_projection.weight.t())
    layer = te2.text_model.encoder.layers[3].self_attn
    fused = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    assert torch.equal(written["conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"], fused)

    with pytest.raises(ValueError, match="SDXL-family checkpoint"):  # the SD 1/2 reader says what it is
        read_checkpoint(files[0])
    checkpoint = read_sgm_checkpoint(files[0])
    assert checkpoint.version == SDXL and checkpoint.ignored == [] and set(checkpoint.extras) == {sgm_keys.POSITION_IDS, sgm_keys.BIGG_LOGIT_SCALE}
    assert checkpoint.prediction_type == "epsilon" and checkpoint.zero_terminal_snr is False
    rebuilt = build_sdxl_models(checkpoint)
    for ours, theirs in zip(sdxl_models, rebuilt):
        assert_same_tensors(ours, theirs)
    assert _public(rebuilt[0].config) == _public(unet.config) and _public(rebuilt[1].config) == _public(vae.config)
    assert rebuilt[2].config.to_dict() == te1.config.to_dict() and rebuilt[3].config.to_dict() == te2.config.to_dict()

    # A base file's own position_ids / logit_scale survive SGM -> diffusers -> SGM unchanged.
    plain = dict(written)
    plain[sgm_keys.BIGG_LOGIT_SCALE] = torch.tensor(4.25)
    plain[sgm_keys.POSITION_IDS] = plain[sgm_keys.POSITION_IDS].float()  # some files store them as floats
    save_file(plain, tmp_path / "base.safetensors")
    base = read_sgm_checkpoint(tmp_path / "base.safetensors")
    again = save_sdxl_checkpoint(tmp_path / "again.safetensors", *build_sdxl_models(base), prediction_type="epsilon",
                                 zero_terminal_snr=False, dtype=torch.float32, extras=base.extras)  # fmt: skip
    rewritten = load_file(again[0])
    assert rewritten.keys() == plain.keys()
    assert [k for k in plain if plain[k].dtype != rewritten[k].dtype or not torch.equal(plain[k], rewritten[k])] == []


def test_shapes_alone_give_the_architecture(sdxl_models, tmp_path):
    """A file without sdtune's metadata (as other tools write it) reads back the same models."""
    unet, vae, te1, te2 = sdxl_models
    save_file(sgm_tensors(unet, vae, te1, te2, torch.float32), tmp_path / "plain.safetensors")
    checkpoint = read_sgm_checkpoint(tmp_path / "plain.safetensors")
    assert checkpoint.prediction_type is None and checkpoint.zero_terminal_snr is None
    unet2, _, te1_2, te2_2 = build_sdxl_models(checkpoint)
    assert unet2.config.transformer_layers_per_block == [1, 2, 10] and unet2.config.addition_time_embed_dim == 8
    torch.testing.assert_close(unet_output(unet2), unet_output(unet), rtol=0, atol=1e-5)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    with torch.no_grad():
        torch.testing.assert_close(te2_2(ids).text_embeds, te2(ids).text_embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(te1_2(ids)[0], te1(ids)[0], rtol=0, atol=1e-6)


def test_diffusers_from_single_file_reads_our_file(sdxl_models, tmp_path):
    """An independent reader: diffusers' SDXL single-file loader, given a local config folder (no hub)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdtune.tiny import clip_tokenizer

    unet, vae, te1, te2 = sdxl_models
    path = save_sdxl_checkpoint(tmp_path / "m.safetensors", unet, vae, te1, te2, prediction_type="v_prediction",
                                zero_terminal_snr=True, dtype=torch.float32)[0]  # fmt: skip
    config = tmp_path / "config"  # the configs of a diffusers folder, no weights
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(base_config(SDXL)["scheduler"]),
    )  # fmt: skip
    pipe.save_config(config)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(config / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(config / name)
    for name in ("tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(config / name)
    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    for ours, their in ((unet, theirs.unet), (vae, theirs.vae), (te1, theirs.text_encoder), (te2, theirs.text_encoder_2)):
        assert_same_tensors(ours, their.float())
    torch.testing.assert_close(unet_output(theirs.unet), unet_output(unet), rtol=0, atol=1e-5)

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("v_pred").numel() == 0 and handle.get_tensor("ztsnr").numel() == 0
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.prediction_type"] == "v" and metadata["sdtune.base_model_version"] == SDXL
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert not (tmp_path / "m.yaml").exists() and not (tmp_path / "m.comfyui.json").exists()


def test_not_an_sdxl_file(tmp_path):
    from sdtune.tiny import reduced_sd

    from sdtune.export.checkpoint import ldm_tensors

    save_file(ldm_tensors(*reduced_sd("sd_v1"), "sd_v1", torch.float32), tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match="not an SDXL-family checkpoint"):
        read_sgm_checkpoint(tmp_path / "sd1.safetensors")
    refiner = {"conditioner.embedders.0.model.ln_final.weight": torch.ones(4), "model.diffusion_model.out.2.weight": torch.ones(4, 4, 3, 3)}
    save_file(refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(ValueError, match="refiner and other SGM models are not supported"):
        read_sgm_checkpoint(tmp_path / "refiner.safetensors")
