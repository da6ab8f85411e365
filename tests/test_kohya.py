"""kohya LoRA files for SD 1 and SD 2: every key is one the UIs address, and merging by their rule equals peft's merge."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from sdtune.adapters import add_lora, lora_layers
from sdtune.export import ldm_keys
from sdtune.export.kohya import check_sd2_text_encoder_targets, kohya_name, kohya_state_dict, merge_lora

# Every kind of UNet layer a LoRA/LoCon can adapt: attention, feed-forward, transformer
# projections, resnet convs (3x3 and 1x1), time embeddings, down/upsamplers, conv_in/out.
UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2",
]  # fmt: skip
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CLIP_KINDS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


def comfyui_addressable(unet, version) -> set[str]:
    """ComfyUI (comfy/lora.py model_lora_keys_unet / _clip): `lora_unet_` + the diffusers name of
    every UNet weight; `lora_te_text_model_encoder_layers_<b>_<kind>` for each layer of its CLIP
    model (SD 2's has all 24 OpenCLIP layers)."""
    names = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in unet.state_dict() if k.endswith(".weight")}
    layers = 12 if version == "sd_v1" else 24
    return names | {f"lora_te_text_model_encoder_layers_{b}_{kind}" for b in range(layers) for kind in CLIP_KINDS}


def a1111_ldm_modules(unet, version) -> set[str]:
    """A1111's network_layer_mapping: its LDM model's module names with `.` -> `_`
    (UNet under `diffusion_model`, text encoder as the FrozenCLIP/OpenCLIP embedder's modules)."""
    ldm_unet = ldm_keys.unet_to_ldm(unet.state_dict(), ldm_keys.unet_layout(unet.config))
    names = {k.removeprefix("model.").rsplit(".", 1)[0].replace(".", "_") for k in ldm_unet}
    if version == "sd_v1":
        kinds = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
        return names | {f"transformer_text_model_encoder_layers_{n}_{k}" for n in range(12) for k in kinds}
    kinds = ["attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj"]  # attn is one nn.MultiheadAttention
    return names | {f"model_transformer_resblocks_{n}_{k}" for n in range(24) for k in kinds}


A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_module(key: str, version: str, modules: set[str]) -> str | None:
    """extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis + its q/k/v fallback."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{_suffix(m[1], m[3])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{_suffix(m[0], m[2])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{_suffix(m[1], m[3])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m: f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: _te(m, version)),
    ]  # fmt: skip
    for pattern, convert in rules:
        match = re.match(pattern, key)
        if match:
            name = convert(match.groups())
            break
    else:
        return None
    if name in modules:
        return name
    fused = re.match(r"(.*)_([qkv]_proj)$", name)  # SD 2: q/k/v live in the fused attention module
    return fused.group(1) if fused and fused.group(1) in modules else None


def _suffix(kind: str, rest: str) -> str:
    return A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def _te(m, version: str) -> str:
    if version == "sd_v1":
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    rest = m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
    return f"model_transformer_resblocks_{m[0]}_{rest}"


@pytest.fixture
def adapted(reduced):
    """A copy of the reduced model with LoRA on every adaptable UNet and text-encoder layer,
    up weights randomised (peft starts them at zero) and alpha != rank."""
    version, unet, _, text_encoder = reduced
    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    base = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    add_lora(unet, rank=4, alpha=3.0, dropout=0.0, target_modules=UNET_TARGETS)
    add_lora(text_encoder, rank=4, alpha=3.0, dropout=0.0, target_modules=TE_TARGETS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for layer in lora_layers(model).values():
                up = layer.lora_B["default"].weight
                up.copy_(torch.randn(up.shape, generator=gen) * 0.1)
    return version, unet, text_encoder, base


def test_every_exported_key_addresses_a_layer_in_both_uis(adapted):
    version, unet, text_encoder, (base_unet, _) = adapted
    tensors = kohya_state_dict(unet, text_encoder, torch.float16, base_model_version=version)
    exported = {k.split(".", 1)[0] for k in tensors}
    trained = {kohya_name("lora_unet_", p) for p in lora_layers(unet)} | {kohya_name("lora_te_", p) for p in lora_layers(text_encoder)}
    assert exported == trained  # every trained module is exported, nothing else
    assert len(tensors) == 3 * len(exported)
    te_layers = text_encoder.config.num_hidden_layers
    assert sum(n.startswith("lora_te_text_model_encoder_layers_") for n in exported) == 6 * te_layers
    assert any(tensors[f"{n}.lora_down.weight"].shape[2:] == (3, 3) for n in exported if n.endswith("conv1"))  # LoCon

    comfyui = comfyui_addressable(base_unet, version)
    assert sorted(exported - comfyui) == []
    modules = a1111_ldm_modules(base_unet, version)
    assert sorted(n for n in exported if a1111_module(n, version, modules) is None) == []
    # The sets are not vacuous: a PEFT-style or SDXL-style name addresses nothing.
    assert a1111_module("lora_te1_text_model_encoder_layers_0_mlp_fc1", version, modules) is None
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_qq" not in comfyui
    assert a1111_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_qq", version, modules) is None


def test_kohya_merge_equals_peft_merge(adapted):
    """W + alpha/rank * up @ down (what both UIs compute) == peft's own merge of the adapter."""
    version, unet, text_encoder, (base_unet, base_te) = adapted
    tensors = kohya_state_dict(unet, text_encoder, torch.float32, base_model_version=version)
    assert all(tensors[k].item() == 3.0 for k in tensors if k.endswith(".alpha"))
    merged_names = merge_lora(tensors, base_unet, base_te)
    assert len(merged_names) == len(lora_layers(unet)) + len(lora_layers(text_encoder))
    for model in (unet, text_encoder):
        for layer in lora_layers(model).values():
            layer.merge()
    for peft_model, ours in ((unet, base_unet), (text_encoder, base_te)):
        theirs = {k.replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}
        mine = ours.state_dict()
        assert theirs.keys() == mine.keys()
        worst = max((theirs[k] - mine[k]).abs().max().item() for k in mine)
        assert worst < 1e-5, worst


def test_partial_sd2_text_encoder_attention_is_refused():
    check_sd2_text_encoder_targets(["q_proj", "k_proj", "v_proj", "out_proj", "fc1"], "sd_v2")
    check_sd2_text_encoder_targets(["fc1", "fc2"], "sd_v2")
    check_sd2_text_encoder_targets(["q_proj", "v_proj"], "sd_v1")  # SD 1 CLIP has separate projections
    with pytest.raises(ValueError, match="A1111 applies a text-encoder LoRA only when"):
        check_sd2_text_encoder_targets(["q_proj", "v_proj"], "sd_v2")


def test_partial_sd2_lora_is_not_exported():
    from sdtune.tiny import reduced_sd

    unet, _, text_encoder = reduced_sd("sd_v2")
    add_lora(text_encoder, rank=2, alpha=2.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="A1111 would apply none of them"):
        kohya_state_dict(unet, text_encoder, base_model_version="sd_v2")


def test_adapters_off_runs_the_base_model_and_restores_the_adapters(reduced):
    """What the previews' base row draws with: inside, the adapted text encoder computes exactly
    what the base does; after, the LoRA again, with each parameter's requires_grad as it was."""
    from sdtune.adapters import adapters_off

    _, _, _, text_encoder = reduced
    base, adapted = copy.deepcopy(text_encoder), copy.deepcopy(text_encoder)
    add_lora(adapted, rank=4, alpha=3.0, dropout=0.0, target_modules=TE_TARGETS)
    layers = list(lora_layers(adapted).values())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    layers[0].lora_A["default"].weight.requires_grad_(False)  # e.g. a part frozen on purpose
    flags = {name: p.requires_grad for name, p in adapted.named_parameters()}
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    with torch.no_grad():
        plain, lora = base(ids).last_hidden_state, adapted(ids).last_hidden_state
        assert not torch.equal(plain, lora)
        with adapters_off(adapted, None):
            assert torch.equal(adapted(ids).last_hidden_state, plain)
        assert torch.equal(adapted(ids).last_hidden_state, lora)
    assert {name: p.requires_grad for name, p in adapted.named_parameters()} == flags
