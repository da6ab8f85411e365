"""kohya LoRA files for SDXL: every key is one ComfyUI and A1111 address on an SDXL model, merging by
their rule equals peft's merge, and diffusers' own kohya loader applies the same LoRA."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from sdtune.adapters import add_lora, lora_layers
from sdtune.export import ldm_keys, sgm_keys
from sdtune.export.kohya import check_sd2_text_encoder_targets, kohya_name, kohya_state_dict, merge_lora
from sdtune.tiny import reduced_sdxl

SDXL = "sdxl_base_v1-0"
UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
    "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2",
]  # fmt: skip
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CLIP_KINDS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


@pytest.fixture(scope="module")
def adapted():
    """Reduced SDXL models with LoRA on every adaptable UNet layer and every layer of both text
    encoders, up weights randomised (peft starts them at zero), alpha 3 != rank 4; and copies of the base."""
    base = reduced_sdxl(seed=1)
    unet, _, te1, te2 = (copy.deepcopy(m) for m in base)
    add_lora(unet, rank=4, alpha=3.0, dropout=0.0, target_modules=UNET_TARGETS)
    for te in (te1, te2):
        add_lora(te, rank=4, alpha=3.0, dropout=0.0, target_modules=TE_TARGETS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (unet, te1, te2):
            for layer in lora_layers(model).values():
                up = layer.lora_B["default"].weight
                up.copy_(torch.randn(up.shape, generator=gen) * 0.1)
    return unet, te1, te2, base


def sgm_unet_modules(unet) -> set[str]:
    """The SGM module of every UNet weight (ComfyUI's and A1111's model is the SGM UNet)."""
    sgm = sgm_keys.unet_to_sgm(unet.state_dict(), ldm_keys.unet_layout(unet.config))
    return {k.removeprefix(ldm_keys.UNET_PREFIX).rsplit(".", 1)[0] for k in sgm if k.endswith(".weight")}


def comfyui_addressable(unet, te1, te2) -> set[str]:
    """ComfyUI (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip on an SDXL model):
    `lora_unet_` + every `diffusion_model.<sgm>.weight` with `.` -> `_`; clip_l layers as
    `lora_te1_` (and `lora_te_`), clip_g layers as `lora_te2_`, the six LORA_CLIP_MAP kinds each."""
    names = {"lora_unet_" + m.replace(".", "_") for m in sgm_unet_modules(unet)}
    for prefix, layers in (("lora_te1_", te1.config.num_hidden_layers), ("lora_te_", te1.config.num_hidden_layers), ("lora_te2_", te2.config.num_hidden_layers)):
        names |= {f"{prefix}text_model_encoder_layers_{b}_{kind}" for b in range(layers) for kind in CLIP_KINDS}
    return names


def a1111_modules(unet, te1, te2) -> set[str]:
    """A1111's network_layer_mapping for SDXL: `diffusion_model_` + the SGM UNet modules; each
    conditioner embedder's wrapped modules as `<i>_<name>`: CLIP-L (transformers names under
    `transformer.`), OpenCLIP bigG (`model.transformer.resblocks.<n>.attn` is one MultiheadAttention)."""
    names = {"diffusion_model_" + m.replace(".", "_") for m in sgm_unet_modules(unet)}
    names |= {"0_transformer_text_model_" + n.removeprefix("text_model.").replace(".", "_") for n, _ in te1.named_modules() if n}
    kinds = ["attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj"]
    return names | {f"1_model_transformer_resblocks_{n}_{k}" for n in range(te2.config.num_hidden_layers) for k in kinds}


def a1111_module(key: str, modules: set[str]) -> str | None:
    """extensions-builtin/Lora/networks.py load_network on an SDXL model: convert_diffusers_name_to_compvis
    (is_sd2 is False: the mapping has no `model_transformer_resblocks` key), the mapping, its q/k/v
    fallback, then the SDXL fallbacks `lora_unet` -> `diffusion_model` and `lora_te1_text_model` ->
    `0_transformer_text_model`."""
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
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[0]}_" + m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")),
    ]  # fmt: skip
    name = key
    for pattern, convert in rules:
        if match := re.match(pattern, key):
            name = convert(match.groups())
            break
    if name in modules:
        return name
    fused = re.match(r"(.*)_([qkv]_proj)$", name)
    if fused and fused.group(1) in modules:
        return fused.group(1)
    if "lora_unet" in key:
        name = key.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in key:
        name = key.replace("lora_te1_text_model", "0_transformer_text_model")
    return name if name in modules else None


A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _suffix(kind: str, rest: str) -> str:
    return A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def test_every_exported_key_addresses_a_layer_in_both_uis(adapted):
    unet, te1, te2, (base_unet, _, base_te1, base_te2) = adapted
    tensors = kohya_state_dict(unet, te1, torch.float16, base_model_version=SDXL, text_encoder_2=te2)
    exported = {k.split(".", 1)[0] for k in tensors}
    assert len(tensors) == 3 * len(exported) and len(exported) == sum(len(lora_layers(m)) for m in (unet, te1, te2))
    table = sgm_keys.unet_table(ldm_keys.unet_layout(unet.config))
    trained = {kohya_name("lora_unet_", p, table) for p in lora_layers(unet)}
    trained |= {kohya_name("lora_te1_", p) for p in lora_layers(te1)} | {kohya_name("lora_te2_", p) for p in lora_layers(te2)}
    assert exported == trained
    # kohya's SDXL names: SGM modules for the UNet, te1 / te2 for the encoders.
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_label_emb_0_0", "lora_unet_input_blocks_1_0_in_layers_2",
                 "lora_te1_text_model_encoder_layers_11_mlp_fc1", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"):  # fmt: skip
        assert name in exported, name
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "lora_te_")) for n in exported)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape[2:] == (3, 3)  # LoCon

    comfyui = comfyui_addressable(base_unet, base_te1, base_te2)
    assert sorted(exported - comfyui) == []
    modules = a1111_modules(base_unet, base_te1, base_te2)
    assert sorted(n for n in exported if a1111_module(n, modules) is None) == []
    # bigG's fused attention: A1111 applies a layer's q/k/v/out_proj only all together; all are there.
    for n in range(te2.config.num_hidden_layers):
        assert all(f"lora_te2_text_model_encoder_layers_{n}_{k}" in exported for k in CLIP_KINDS[:4])
    # The rules are not vacuous: what A1111 does not map on SDXL is refused by the model of it.
    assert a1111_module("lora_te_text_model_encoder_layers_0_mlp_fc1", modules) is None  # SD 1 naming
    assert a1111_module("lora_unet_up_blocks_0_upsamplers_0_conv", modules) is None  # diffusers naming, wrong block
    assert a1111_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", modules) is not None
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_qq" not in comfyui


def test_kohya_merge_equals_peft_merge(adapted):
    """W + alpha/rank * up @ down (what both UIs compute) == peft's own merge, with alpha 3 != rank 4."""
    unet, te1, te2, base = adapted
    tensors = kohya_state_dict(unet, te1, torch.float32, base_model_version=SDXL, text_encoder_2=te2)
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {3.0}
    base_unet, _, base_te1, base_te2 = (copy.deepcopy(m) for m in base)
    merged = merge_lora(tensors, base_unet, base_te1, text_encoder_2=base_te2)
    assert len(merged) == sum(len(lora_layers(m)) for m in (unet, te1, te2))
    for peft_model, ours in ((unet, base_unet), (te1, base_te1), (te2, base_te2)):
        # peft's merge adds into the base layers and keeps lora_A/B, so later exports are unchanged.
        for layer in lora_layers(peft_model).values():
            layer.merge()
        theirs = {k.replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}
        mine = ours.state_dict()
        assert theirs.keys() == mine.keys()
        worst = max((theirs[k] - mine[k]).abs().max().item() for k in mine)
        assert worst < 1e-5, worst
    with pytest.raises(KeyError, match="address no module"):
        merge_lora({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1)}, *base[:1], base[2], text_encoder_2=base[3])


def test_diffusers_load_lora_weights_agrees(adapted, tmp_path):
    """diffusers' StableDiffusionXLPipeline.load_lora_weights reads our kohya file (SGM UNet names,
    te1/te2, alphas) to the same UNet and text-encoder outputs as our merge."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from sdtune.export.checkpoint import base_config
    from sdtune.tiny import clip_tokenizer

    unet, te1, te2, base = adapted
    # Every layer kind: attention, feed-forward, projections, resnets (LoCon), samplers, time and size embeddings.
    tensors = kohya_state_dict(unet, te1, torch.float32, base_model_version=SDXL, text_encoder_2=te2)
    assert any(k.startswith("lora_unet_label_emb_0_0") for k in tensors) and any("in_layers_2" in k for k in tensors)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    base_unet, vae, base_te1, base_te2 = (copy.deepcopy(m) for m in base)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=base_te1, text_encoder_2=base_te2, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"),
        unet=base_unet, scheduler=EulerDiscreteScheduler.from_config(base_config(SDXL)["scheduler"]),
    )  # fmt: skip
    pipe.load_lora_weights(str(path))
    merged = [copy.deepcopy(m) for m in (base[0], base[2], base[3])]
    merge_lora(tensors, merged[0], merged[1], text_encoder_2=merged[2])

    from test_sdxl import unet_output

    torch.testing.assert_close(unet_output(pipe.unet), unet_output(merged[0]), rtol=0, atol=1e-4)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], merged[1](ids)[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(pipe.text_encoder_2(ids).text_embeds, merged[2](ids).text_embeds, rtol=0, atol=1e-4)
        # ...and the LoRA does change them (the comparison is not between two base models).
        assert (base[3](ids).text_embeds - merged[2](ids).text_embeds).abs().max() > 1e-3


def test_partial_bigg_attention_is_refused():
    check_sd2_text_encoder_targets(["q_proj", "k_proj", "v_proj", "out_proj", "fc1"], SDXL)
    with pytest.raises(ValueError, match="SDXL .its OpenCLIP bigG encoder."):
        check_sd2_text_encoder_targets(["q_proj", "v_proj"], SDXL)
    unet, _, te1, te2 = reduced_sdxl(seed=2, randomise=False)
    add_lora(te2, rank=2, alpha=2.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="A1111 would apply none of them"):
        kohya_state_dict(unet, None, base_model_version=SDXL, text_encoder_2=te2)
    add_lora(te1, rank=2, alpha=2.0, dropout=0.0, target_modules=["q_proj", "v_proj"])  # CLIP-L has separate projections
    assert any(k.startswith("lora_te1_") for k in kohya_state_dict(unet, te1, base_model_version=SDXL))
