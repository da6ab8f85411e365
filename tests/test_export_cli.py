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
