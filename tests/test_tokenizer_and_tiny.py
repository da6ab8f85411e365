"""The real CLIP tokenizer made offline, and the tiny model builder (`sdtune make-tiny`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from sdtune.tiny import CLIP_BPE_DIR, clip_tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids for "a photo of a cat"


def test_clip_tokenizer_encodes_like_clip():
    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_shipped_vocab_matches_the_bpe_file_layout():
    vocab = json.loads((CLIP_BPE_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (CLIP_BPE_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # Each merge adds the token at 512 + its index.
    a, b = merges[1].split()
    assert vocab[a + b] == 512


def test_make_tiny_cli_writes_a_loadable_pipeline(tmp_path, capsys):
    out = tmp_path / "tiny"
    run = subprocess.run(
        [sys.executable, "-m", "sdtune.cli", "make-tiny", str(out), "--prediction-type", "v"],
        capture_output=True, text=True, check=True,
    )
    assert str(out) in run.stdout
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    # The portable tokenizer files alone (what kohya / transformers 4 read) give the same ids.
    portable = tmp_path / "portable"
    portable.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(out / "tokenizer" / name, portable / name)
    assert CLIPTokenizer.from_pretrained(portable)("a photo of a cat").input_ids == CAT_IDS

    from sdtune.cli import main  # the same CLI in this process: a second interpreter start costs ~10 s

    assert main(["make-tiny", str(out)]) == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_tiny_models_are_deterministic(tmp_path, prediction):
    from sdtune.tiny import make_tiny

    a, b = make_tiny(tmp_path / "a", prediction), make_tiny(tmp_path / "b", prediction)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes()


def test_make_tiny_sd2_is_an_sd2_model_everywhere(tmp_path):
    """--arch sd2: detected as SD 2.x from the folder and from the single file written from it,
    pads with "!" like SD 2, and an SD 1 tiny stays SD 1."""
    import torch
    from safetensors import safe_open

    from sdtune.data.captions import tokenize
    from sdtune.export.checkpoint import build_models, read_checkpoint
    from sdtune.export.commands import export_checkpoint
    from sdtune.models import load_components

    out = tmp_path / "tiny-sd2"
    subprocess.run([sys.executable, "-m", "sdtune.cli", "make-tiny", str(out), "--arch", "sd2", "--prediction-type", "v"], check=True, capture_output=True)
    parts = load_components(out, "v_prediction", zero_terminal_snr=False)
    assert parts.base_model_version == "sd_v2"
    assert parts.unet.config.use_linear_projection and parts.text_encoder.config.hidden_act == "gelu"
    assert tokenize(parts.tokenizer, ["a photo of a cat"])[0, 7:].eq(0).all()  # SD 2 pads with "!" (id 0)
    single = export_checkpoint(out, tmp_path / "sd2.safetensors", dtype="fp32")[0]
    checkpoint = read_checkpoint(single)
    assert checkpoint.version == "sd_v2"
    with safe_open(str(single), framework="pt") as handle:  # OpenCLIP layout, as SD 2 files have
        assert any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in handle.keys())
    unet = build_models(checkpoint, torch.float32)[0]
    assert all(torch.equal(v, parts.unet.state_dict()[k]) for k, v in unet.state_dict().items())
    from sdtune.tiny import make_tiny

    assert load_components(make_tiny(tmp_path / "sd1", "epsilon"), "epsilon", False).base_model_version == "sd_v1"


def test_make_tiny_sdxl_has_sdxl_topology_and_generates(tmp_path, capsys):
    """--arch sdxl: the real SDXL 1.0 block layout and depths at reduced width, two text encoders
    and tokenizers, loadable by diffusers' StableDiffusionXLPipeline, which generates with it."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from sdtune.cli import main
    from sdtune.data.captions import tokenize
    from sdtune.sdxl import is_sdxl, load_sdxl_components

    out = tmp_path / "tiny-sdxl"
    assert main(["make-tiny", str(out), "--arch", "sdxl", "--prediction-type", "v"]) == 0
    assert str(out) in capsys.readouterr().out
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    unet = pipe.unet
    assert list(unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.config.addition_embed_type == "text_time" and len(unet.config.block_out_channels) == 3
    # SDXL's transformer depths: none at the first level, 2 at the second, 10 at the third and in the middle.
    depths = [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in unet.down_blocks]
    assert depths == [[], [2, 2], [10, 10]] and len(unet.mid_block.attentions[0].transformer_blocks) == 10
    assert [len(a.transformer_blocks) for a in unet.up_blocks[0].attentions] == [10, 10, 10]
    assert [len(r) for r in (unet.down_blocks[0].resnets, unet.up_blocks[2].resnets)] == [2, 3]
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert (pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers) == (12, 32)
    assert (pipe.text_encoder.config.hidden_act, pipe.text_encoder_2.config.hidden_act) == ("quick_gelu", "gelu")
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.vae.config.scaling_factor == 0.13025
    # tokenizer pads with <|endoftext|>, tokenizer_2 with "!" (id 0), as SDXL's do; the portable BPE files are there.
    assert tokenize(pipe.tokenizer, ["a photo of a cat"])[0, 7:].eq(49407).all()
    assert tokenize(pipe.tokenizer_2, ["a photo of a cat"])[0, 7:].eq(0).all()
    assert (out / "tokenizer_2" / "vocab.json").is_file() and (out / "tokenizer_2" / "merges.txt").is_file()
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    assert is_sdxl(out) and not is_sdxl(tmp_path)
    parts = load_sdxl_components(out, "v_prediction", zero_terminal_snr=False)
    assert parts.base_model_version == "sdxl_base_v1-0" and parts.tokenizer_2.pad_token == "!"
    assert torch.equal(parts.unet.state_dict()["add_embedding.linear_1.weight"], unet.state_dict()["add_embedding.linear_1.weight"])
