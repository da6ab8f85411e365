"""`sdtune inspect`: LoRA layers that change nothing, and how the UIs run a v-prediction / zero-terminal-SNR checkpoint."""

from __future__ import annotations

import json

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sdtune.adapters import add_lora
from sdtune.cli import main
from sdtune.export.commands import export_checkpoint
from sdtune.export.inspect import zero_update_layers
from sdtune.export.kohya import kohya_state_dict

MID_Q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
MID_K = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"
SD1_METADATA = {"ss_v2": "False", "ss_base_model_version": "sd_v1"}


def _layer(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    # Copies: safetensors refuses to save tensors that share memory.
    return {f"{name}.lora_up.weight": up.clone(), f"{name}.lora_down.weight": down.clone(), f"{name}.alpha": torch.tensor(alpha)}


def _warning_lines(report: str, marker: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("warning:") and marker in line]


def test_zero_update_layers_names_exactly_the_layers_that_change_nothing():
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(8, 2, generator=gen), torch.randn(2, 16, generator=gen)
    sparse_up = torch.zeros(8, 2)
    sparse_up[3, 1] = 1e-6  # one non-zero value: the update is not zero
    tensors = (
        _layer("lora_unet_a_to_q", torch.zeros(8, 2), down)
        | _layer("lora_unet_b_to_k", up, torch.zeros(2, 16))
        | _layer("lora_unet_c_to_v", up, down, alpha=0.0)
        | _layer("lora_te_text_model_encoder_layers_0_mlp_fc1", torch.zeros(8, 2, dtype=torch.float16), down.half())
        | _layer("lora_unet_d_to_out_0", up, down)
        | _layer("lora_unet_e_ff_net_2", sparse_up, down)
        | {"lora_unet_f_conv1.lora_up.weight": torch.zeros(8, 2, 1, 1)}  # no lora_down: skipped by the UIs, not counted here
        | {"optimizer_step": torch.tensor(0)}
    )  # fmt: skip
    assert zero_update_layers(tensors) == [
        "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_a_to_q", "lora_unet_b_to_k", "lora_unet_c_to_v",
    ]  # fmt: skip
    assert zero_update_layers({}) == []


def _lora_trained_at_one_pixel_mid_block(tiny_v) -> dict[str, torch.Tensor]:
    """One SGD step of a LoRA on the tiny UNet with 4x4 latents, so its middle block sees a 1x1 feature
    map (as SD 1's does at 64 px); exported in fp16 as a run exports it."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_v, subfolder="unet")
    add_lora(unet, rank=4, alpha=4.0, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    unet(x, torch.tensor([10, 700]), cond).sample.square().mean().backward()
    torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=1.0).step()
    return kohya_state_dict(unet, dtype=torch.float16)


def test_self_attention_on_a_1x1_map_trains_nothing_and_inspect_names_it(tiny_v, tmp_path, capsys):
    tensors = _lora_trained_at_one_pixel_mid_block(tiny_v)
    layers = {key.split(".", 1)[0] for key in tensors}
    # Softmax over one token is 1 whatever q and k are: those two layers get no gradient, every other one does.
    assert zero_update_layers(tensors) == [MID_K, MID_Q]

    path = tmp_path / "lora.safetensors"
    save_file(tensors, path, metadata=SD1_METADATA)
    assert main(["inspect", str(path)]) == 0
    report = capsys.readouterr().out
    [warning] = _warning_lines(report, "change nothing")
    assert warning.startswith(f"warning: 2 of {len(layers)} layers change nothing (lora_up is all zeros): {MID_K}, {MID_Q};")
    assert "got no gradient" in warning and "1x1" in warning
    named = {name for name in layers if name in warning}
    assert named == {MID_K, MID_Q}  # attn1 to_v / to_out_0 and attn2 of the same block trained


def test_inspect_warns_about_each_kind_of_zero_update_and_shortens_long_lists(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(64, 2, generator=gen), torch.randn(2, 32, generator=gen)
    zero_up = [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in ("q", "k", "v", "out_0")]
    tensors = {}
    for name in zero_up:
        tensors |= _layer(name, torch.zeros(64, 2), down)
    tensors |= _layer("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", up, torch.zeros(2, 32))
    tensors |= _layer("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k", up, down, alpha=0.0)
    tensors |= _layer("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v", up, down)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path, metadata=SD1_METADATA)

    assert main(["inspect", str(path)]) == 0
    report = capsys.readouterr().out
    [ups] = _warning_lines(report, "(lora_up is all zeros)")
    assert ups.startswith("warning: 4 of 7 layers change nothing (lora_up is all zeros): ") and "and 1 more" in ups
    assert sum(name in ups for name in zero_up) == 3  # a few names, not all of them
    [downs] = _warning_lines(report, "(lora_down is all zeros)")
    assert "1 of 7 layers" in downs and "attn1_to_q" in downs and "up_blocks_1" in downs
    [alphas] = _warning_lines(report, "(alpha is 0)")
    assert "1 of 7 layers" in alphas and "up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k" in alphas
    assert "attn1_to_v" not in "".join(_warning_lines(report, "change nothing"))


def _inspect(path, capsys) -> str:
    assert main(["inspect", str(path)]) == 0
    return capsys.readouterr().out


def test_v_prediction_zsnr_checkpoint_says_how_each_ui_runs_it(tiny_v, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    written = export_checkpoint(tiny_v, out, zero_terminal_snr=True, dtype="fp32")
    workflow, config = tmp_path / "model.comfyui.json", tmp_path / "model.yaml"
    assert set(written) == {out, workflow, config}

    # Both sidecars beside it: say what each UI does and to use them; nothing is wrong with the files.
    report = _inspect(out, capsys)
    assert "warning" not in report, report
    [comfy] = [line for line in report.splitlines() if line.startswith("ComfyUI:")]
    assert "loads this SD 1 checkpoint as epsilon without zero terminal SNR" in comfy
    assert "only for SDXL-family models" in comfy and "v-prediction with zero terminal SNR" in comfy
    assert "use model.comfyui.json" in comfy
    assert 'read the model config from model.yaml beside it (parameterization "v"): use it' in report
    assert "Zero Terminal SNR" in report  # A1111's noise-schedule setting: no file can say it

    # A workflow that samples eps is as bad as none.
    nodes = json.loads(workflow.read_text())
    nodes["2"]["inputs"]["sampling"] = "eps"
    workflow.write_text(json.dumps(nodes))
    [stale] = _warning_lines(_inspect(out, capsys), "ComfyUI")
    assert "model.comfyui.json beside it does not set that" in stale

    # Without the sidecars: warnings that say which file is missing and what writes it.
    workflow.unlink()
    config.unlink()
    report = _inspect(out, capsys)
    assert "use model.comfyui.json" not in report and "use it" not in report
    [comfy] = _warning_lines(report, "ComfyUI")
    assert "ComfyUI loads this SD 1 checkpoint as epsilon without zero terminal SNR" in comfy
    assert "(model.comfyui.json, a ModelSamplingDiscrete node) is missing" in comfy
    assert "`sdtune export checkpoint model.safetensors NEW.safetensors --prediction-type v --zero-terminal-snr` writes it" in comfy
    [a1111] = _warning_lines(report, "A1111")
    assert 'A1111 runs this SD 1 checkpoint as epsilon unless model.yaml beside it says parameterization "v"; it is missing;' in a1111
    assert "--prediction-type v" in a1111


def test_sd2_v_checkpoint_names_comfyuis_guess(tiny_sd2_v, tmp_path, capsys):
    out = tmp_path / "sd2.safetensors"
    export_checkpoint(tiny_sd2_v, out, zero_terminal_snr=False, dtype="fp32")
    report = _inspect(out, capsys)
    assert "warning" not in report, report
    assert "ComfyUI: guesses epsilon or v for this SD 2 checkpoint from its weights" in report
    assert "Zero Terminal SNR" not in report  # not a zero-terminal-SNR model
    (tmp_path / "sd2.comfyui.json").unlink()
    (tmp_path / "sd2.yaml").unlink()
    report = _inspect(out, capsys)
    assert "(sd2.comfyui.json, a ModelSamplingDiscrete node) is missing" in report
    assert "A1111 guesses epsilon or v for this SD 2 checkpoint from a test run" in report


def test_epsilon_checkpoint_needs_no_sidecars_but_a_stale_v_yaml_is_named(tiny_v, tmp_path, capsys):
    out = tmp_path / "eps.safetensors"
    assert export_checkpoint(tiny_v, out, prediction="epsilon", zero_terminal_snr=False, dtype="fp32") == [out]
    report = _inspect(out, capsys)
    assert "warning" not in report and "ComfyUI" not in report and "A1111" not in report, report
    # A v config left from an earlier export: A1111 would follow it.
    (tmp_path / "eps.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    [stale] = _warning_lines(_inspect(out, capsys), "eps.yaml")
    assert "says parameterization 'v' and A1111 follows it, but this model is epsilon; delete it" in stale
