"""`sdtune export` and `sdtune inspect` end to end on the tiny model."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from sdtune.adapters import add_lora
from sdtune.cli import main
from sdtune.export.checkpoint import build_models, read_checkpoint


def _unet_output(unet):
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([300]), cond).sample


def test_diffusers_folder_to_single_file_and_back(tiny_v, tmp_path, capsys):
    single = tmp_path / "tiny.safetensors"
    assert main(["export", "checkpoint", str(tiny_v), str(single), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    # The tiny model's scheduler says v-prediction, so the markers and both sidecars are written.
    for name in ("tiny.safetensors", "tiny.yaml", "tiny.comfyui.json"):
        assert f"sdtune: wrote {tmp_path / name}" in printed
    assert "v_pred" in load_file(single)

    back = tmp_path / "back"
    assert main(["export", "diffusers", str(single), str(back), "--dtype", "fp32"]) == 0
    for sub, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        ours, original = cls.from_pretrained(back, subfolder=sub), cls.from_pretrained(tiny_v, subfolder=sub)
        a, b = ours.state_dict(), original.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert main(["export", "diffusers", str(single), str(back)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces a folder sdtune wrote, and leaves any other folder alone.
    assert main(["export", "diffusers", str(single), str(back), "--dtype", "fp32", "--overwrite"]) == 0
    unrelated = tmp_path / "my-models"
    (unrelated / "keep-me").mkdir(parents=True)
    assert main(["export", "diffusers", str(single), str(unrelated), "--overwrite"]) == 2
    assert "not written by sdtune" in capsys.readouterr().err and (unrelated / "keep-me").is_dir()
    other_file = tmp_path / "someone-elses.safetensors"
    save_file({"x": torch.zeros(1)}, str(other_file))
    assert main(["export", "checkpoint", str(tiny_v), str(other_file), "--overwrite"]) == 2
    assert load_file(other_file).keys() == {"x"}

    assert main(["inspect", str(single)]) == 0
    report = capsys.readouterr().out
    assert "full model, single-file LDM checkpoint" in report and "prediction type: v_prediction" in report
    assert "SD 1.x" in report and "warning" not in report


def test_peft_lora_to_kohya_then_merged_into_a_single_file(tiny_v, tmp_path, capsys):
    unet = UNet2DConditionModel.from_pretrained(tiny_v, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_v, subfolder="text_encoder")
    add_lora(unet, rank=4, alpha=2.0, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    add_lora(text_encoder, rank=4, alpha=2.0, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    with torch.no_grad():
        for name, p in [*unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    # The diffusers LoRA layout: component prefix, dotted module paths, no alpha.
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, save_embedding_layers=False).items()}
    state |= {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(text_encoder, save_embedding_layers=False).items()}
    save_file(state, peft_file)

    assert main(["inspect", str(peft_file)]) == 0
    report = capsys.readouterr().out
    assert "PEFT/diffusers dotted names" in report and "no ss_v2 metadata" in report

    kohya = tmp_path / "kohya.safetensors"
    args = ["export", "lora", str(peft_file), str(kohya), "--alpha", "2", "--base-version", "sd_v1", "--prediction-type", "v", "--dtype", "fp32"]
    assert main(args) == 0
    assert f"sdtune: wrote {kohya}" in capsys.readouterr().out
    tensors = load_file(kohya)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in tensors)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}
    assert main(["inspect", str(kohya)]) == 0
    report = capsys.readouterr().out
    assert "warning" not in report, report
    assert "unet attention: 56 layers; rank 4, alpha 2.0" in report and "text encoder attention: 8 layers" in report
    assert "unet conv / resnet (LoCon): 11 layers; rank 4, alpha 2.0, 3x3 kernel" in report

    merged = tmp_path / "merged.safetensors"
    assert main(["export", "merge", str(kohya), str(merged), "--base", str(tiny_v), "--dtype", "fp32"]) == 0
    checkpoint = read_checkpoint(merged)
    assert checkpoint.prediction_type == "v_prediction" and checkpoint.metadata["sdtune.merged_lora"] == "kohya.safetensors"
    merged_unet, _, merged_te = build_models(checkpoint)
    torch.testing.assert_close(_unet_output(merged_unet), _unet_output(unet), rtol=0, atol=1e-5)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        torch.testing.assert_close(merged_te(ids)[0], text_encoder(ids)[0], rtol=0, atol=1e-5)


def test_inspect_warns_about_what_the_uis_drop(tmp_path, capsys):
    down, up = torch.zeros(2, 1024), torch.zeros(1024, 2)
    tensors = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 1024),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 2),
        "optimizer_step": torch.tensor(3),
    }
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"ss_network_dim": "2"})
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 0
    report = capsys.readouterr().out
    assert "base model: SD 2.x" in report  # from the 1024-wide cross-attention
    for expected in ("no ss_v2 metadata", "named lora_te1_", "only part of q/k/v/out_proj", "have no .alpha", "1 stray tensor(s)"):
        assert expected in report, expected


def test_sdxl_files_through_export_and_inspect(tmp_path, capsys):
    """SDXL end to end on the command line: a diffusers folder -> SGM single file (markers, no sidecars)
    -> diffusers -> SGM again, bit-exact; a PEFT LoRA of all three models -> kohya SDXL names -> merged
    into the base, equal to the LoRA model; inspect names each file SDXL and finds nothing wrong."""
    import json

    from transformers import CLIPTextModelWithProjection

    from sdtune.export.sgm_checkpoint import build_sdxl_models, read_sgm_checkpoint
    from sdtune.tiny import make_tiny
    from test_sdxl import unet_output

    tiny = make_tiny(tmp_path / "tiny-sdxl", "epsilon", arch="sdxl_base_v1-0")
    single = tmp_path / "xl.safetensors"
    assert main(["export", "checkpoint", str(tiny), str(single), "--dtype", "fp32", "--prediction-type", "v", "--zero-terminal-snr"]) == 0
    assert capsys.readouterr().out.strip() == f"sdtune: wrote {single}"  # SDXL: the markers are enough, no sidecars
    written = load_file(single)
    assert written["v_pred"].numel() == 0 and "ztsnr" in written and "conditioner.embedders.1.model.logit_scale" in written
    assert main(["inspect", str(single)]) == 0
    report = capsys.readouterr().out
    assert "single-file SGM (SDXL) checkpoint" in report and "SDXL 1.0 family" in report and "warning" not in report, report
    assert "transformer depths [0, 2, 10]" in report and "OpenCLIP bigG 32 layers" in report
    assert "v_pred marker makes them run it as v-prediction (ComfyUI with zero terminal SNR" in report

    back = tmp_path / "back"
    assert main(["export", "diffusers", str(single), str(back), "--dtype", "fp32"]) == 0
    scheduler = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]
    again = tmp_path / "again.safetensors"
    assert main(["export", "checkpoint", str(back), str(again), "--dtype", "fp32"]) == 0
    rewritten = load_file(again)
    assert rewritten.keys() == written.keys() and all(torch.equal(rewritten[k], written[k]) for k in written)

    # A diffusers-layout LoRA of the UNet and both encoders, alpha 2 != rank 4.
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    te2 = CLIPTextModelWithProjection.from_pretrained(tiny, subfolder="text_encoder_2")
    add_lora(unet, rank=4, alpha=2.0, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "linear_1"])
    add_lora(te2, rank=4, alpha=2.0, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    with torch.no_grad():
        for name, p in [*unet.named_parameters(), *te2.named_parameters()]:
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, save_embedding_layers=False).items()}
    state |= {f"text_encoder_2.{k}": v for k, v in get_peft_model_state_dict(te2, save_embedding_layers=False).items()}
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, peft_file)
    kohya = tmp_path / "xl-lora.safetensors"
    assert main(["export", "lora", str(peft_file), str(kohya), "--alpha", "2", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    tensors, metadata = load_file(kohya), safe_metadata(kohya)
    names = {k.split(".", 1)[0] for k in tensors}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names and "lora_unet_label_emb_0_0" in names
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc1" in names and not any(n.startswith(("lora_te_", "lora_te1_")) for n in names)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert main(["inspect", str(kohya)]) == 0
    report = capsys.readouterr().out
    assert "base model: SDXL 1.0 family" in report and "warning" not in report, report

    merged = tmp_path / "merged.safetensors"
    assert main(["export", "merge", str(kohya), str(merged), "--base", str(tiny), "--dtype", "fp32"]) == 0
    merged_unet, _, _, merged_te2 = build_sdxl_models(read_sgm_checkpoint(merged))
    torch.testing.assert_close(unet_output(merged_unet), unet_output(unet), rtol=0, atol=1e-5)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    with torch.no_grad():
        torch.testing.assert_close(merged_te2(ids).text_embeds, te2(ids).text_embeds, rtol=0, atol=1e-5)


def safe_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()
