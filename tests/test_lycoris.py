"""DoRA, LoHa and LoKr: trained through peft, exported in LyCORIS' keys, merged by our reader and by
ComfyUI's rules to the weights peft itself merges, layer by layer (convolutions included)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch

from sdtune.adapters import UNET_PRESETS, add_lora, lora_layers
from sdtune.export.kohya import kohya_name, kohya_state_dict, merge_lora

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
KINDS = {"dora": ("lora", True), "loha": ("loha", False), "lokr": ("lokr", False)}


@pytest.fixture(scope="module")
def reduced_v1():
    from sdtune.tiny import reduced_sd

    unet, _, text_encoder = reduced_sd("sd_v1")
    return unet, text_encoder


def _adapted(reduced_v1, kind: str):
    """Copies of the reduced SD 1 UNet (preset locon: attention, feed-forward, resnet and resampling
    convs, 3x3 at their own rank/alpha) and text encoder with ``kind`` on them, every trained tensor
    randomised (peft starts the update at zero, and DoRA's magnitude at the weight norm)."""
    algorithm, use_dora = KINDS[kind]
    unet, text_encoder = copy.deepcopy(reduced_v1[0]), copy.deepcopy(reduced_v1[1])
    add_lora(unet, 4, 3.0, 0.0, UNET_PRESETS["locon"], conv_rank=2, conv_alpha=5.0, algorithm=algorithm, use_dora=use_dora)
    add_lora(text_encoder, 4, 3.0, 0.0, TE_TARGETS, algorithm=algorithm, use_dora=use_dora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))
                elif param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if kind == "loha" else 0.1))
    return unet, text_encoder


def _peft_merged(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight as peft merges it (LoraLayer/LycorisLayer.merge: DoRA's magnitude included)."""
    merged = {}
    for path, layer in lora_layers(model).items():
        layer.merge(safe_merge=True)
        merged[path] = layer.get_base_layer().weight.detach().clone()
        layer.unmerge()
    return merged


def _layers(unet, text_encoder):
    return [("lora_unet_", unet, p) for p in lora_layers(unet)] + [("lora_te_", text_encoder, p) for p in lora_layers(text_encoder)]


@dataclass(frozen=True)
class Adapted:
    unet: torch.nn.Module  # with the adapter; read, never changed, by the tests
    text_encoder: torch.nn.Module
    tensors: dict[str, torch.Tensor]  # its kohya/LyCORIS file, fp32
    originals: dict[str, torch.Tensor]  # each adapted layer's base weight, by kohya name
    merged: dict[str, torch.Tensor]  # the same layers as peft merges them, by kohya name


@pytest.fixture(scope="module")
def adapted(reduced_v1):
    """``adapted(kind)``: the adapted models, their file and peft's merge, made once per kind
    (the merge of ~350 layers is most of each test's time) and shared by the tests that read them."""
    made = {}

    def get(kind: str) -> Adapted:
        if kind not in made:
            unet, text_encoder = _adapted(reduced_v1, kind)
            layers = _layers(unet, text_encoder)
            originals = {kohya_name(prefix, path): model.get_submodule(path).get_base_layer().weight.detach().clone()
                         for prefix, model, path in layers}
            merged = {kohya_name("lora_unet_", p): w for p, w in _peft_merged(unet).items()} | {
                kohya_name("lora_te_", p): w for p, w in _peft_merged(text_encoder).items()}
            tensors = kohya_state_dict(unet, text_encoder, torch.float32, base_model_version="sd_v1")
            made[kind] = Adapted(unet, text_encoder, tensors, originals, merged)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_our_merge_of_the_file_equals_peft_per_layer(reduced_v1, adapted, kind):
    made = adapted(kind)
    tensors = made.tensors
    suffixes = {key.split(".", 1)[1] for key in tensors}
    assert suffixes == {
        "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},  # w2 full where rank >= half its size
    }[kind]
    base_unet, base_te = copy.deepcopy(reduced_v1[0]), copy.deepcopy(reduced_v1[1])
    merge_lora(tensors, base_unet, base_te)
    ours = {kohya_name(prefix, path): (base_unet if prefix == "lora_unet_" else base_te).get_submodule(path).weight
            for prefix, _, path in _layers(made.unet, made.text_encoder)}
    theirs, originals = made.merged, made.originals
    assert ours.keys() == theirs.keys() == originals.keys() and len(ours) > 100
    convs = [n for n, w in ours.items() if w.ndim == 4 and w.shape[2:] == (3, 3)]
    assert convs  # 3x3 convolutions (LoCon) are among the compared layers
    for name in ours:
        peft_delta, our_delta = theirs[name] - originals[name], ours[name] - originals[name]
        assert peft_delta.abs().max() > 1e-4, name  # each layer changes the weight
        assert (our_delta - peft_delta).abs().max() <= 1e-5 * max(1.0, peft_delta.abs().max().item()), name
    if kind == "dora":
        conv = next(k for k in tensors if k.endswith("conv1.dora_scale"))
        assert tensors[conv].shape[1:] == (1, 1, 1) and tensors[conv].shape[0] > 1  # one magnitude per output channel


# ComfyUI's loader (comfy/lora.py load_lora, comfy/weight_adapter/{lora,loha,lokr,base}.py, master of
# 2026), restated: a layer's `alpha` and `dora_scale` are read first; the adapter is the first of LoRA
# (`.lora_up.weight`), LoHa (`.hada_w1_a`), LoKr (any `.lokr_*`) whose key is present.
def comfyui_weight(lora: dict[str, torch.Tensor], name: str, weight: torch.Tensor, norm_of_adapted: bool = False) -> torch.Tensor:
    alpha = lora[f"{name}.alpha"].item() if f"{name}.alpha" in lora else None
    dora_scale = lora.get(f"{name}.dora_scale")
    weight = weight.clone().float()
    if f"{name}.lora_up.weight" in lora:
        mat1, mat2 = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        scale = alpha / mat2.shape[0] if alpha is not None else 1.0
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    elif f"{name}.hada_w1_a" in lora:
        scale = alpha / lora[f"{name}.hada_w1_b"].shape[0] if alpha is not None else 1.0
        m1 = torch.mm(lora[f"{name}.hada_w1_a"].float(), lora[f"{name}.hada_w1_b"].float())
        m2 = torch.mm(lora[f"{name}.hada_w2_a"].float(), lora[f"{name}.hada_w2_b"].float())
        diff = (m1 * m2).reshape(weight.shape)
    else:
        dim = None
        w1 = lora.get(f"{name}.lokr_w1")
        if w1 is None:
            dim = lora[f"{name}.lokr_w1_b"].shape[0]
            w1 = torch.mm(lora[f"{name}.lokr_w1_a"].float(), lora[f"{name}.lokr_w1_b"].float())
        w2 = lora.get(f"{name}.lokr_w2")
        if w2 is None:
            dim = lora[f"{name}.lokr_w2_b"].shape[0]
            w2 = torch.mm(lora[f"{name}.lokr_w2_a"].float(), lora[f"{name}.lokr_w2_b"].float())
        w1, w2 = w1.float(), w2.float()
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    if dora_scale is None:
        return weight + scale * diff
    # base.py weight_decompose; its output-axis branch takes the norm of the base weight (ComfyUI PR
    # #15458, open, changes it to the adapted weight, as LyCORIS and peft do): `norm_of_adapted`.
    calc = weight + scale * diff
    if dora_scale.shape[0] == calc.shape[0]:
        source = calc if norm_of_adapted else weight
        norm = source.reshape(source.shape[0], -1).norm(dim=1, keepdim=True).reshape(source.shape[0], *[1] * (source.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    return calc * (dora_scale.float() / norm)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_comfyui_rules_read_the_file_as_peft_merged_it(adapted, kind):
    made = adapted(kind)
    tensors, originals, theirs = made.tensors, made.originals, made.merged
    for name, original in originals.items():
        tolerance = 1e-5 * max(1.0, (theirs[name] - original).abs().max().item())
        comfy = comfyui_weight(tensors, name, original, norm_of_adapted=kind == "dora")
        assert (comfy - theirs[name]).abs().max() <= tolerance, name
        if kind == "dora":
            # Today's ComfyUI divides by the base weight's norm: each output channel comes out
            # ||W + dW|| / ||W|| times peft's, which the DoRA notes in docs/recipes.md say.
            today = comfyui_weight(tensors, name, original)
            ratio = _lora_part(tensors, name, original).flatten(1).norm(dim=1) / original.flatten(1).norm(dim=1)
            expected = theirs[name] * ratio.reshape(-1, *[1] * (original.ndim - 1))
            assert (today - expected).abs().max() <= 1e-4 * expected.abs().max(), name


# A1111's built-in extension (extensions-builtin/Lora/network_hada.py, network_lokr.py, network.py
# calc_scale), restated for LoHa and LoKr: dim = hada_w1_b's rows; for LoKr lokr_w1_b's, then
# lokr_w2_b's rows, else none; scale = alpha / dim, or 1.0 without alpha or dim.
def a1111_updown(lora: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    w = {key.split(".", 1)[1]: value.float() for key, value in lora.items() if key.split(".", 1)[0] == name}
    if "hada_w1_a" in w:
        dim = w["hada_w1_b"].shape[0]
        shape = [w["hada_w1_a"].size(0), w["hada_w1_b"].size(1)]
        updown = (w["hada_w1_a"] @ w["hada_w1_b"]).reshape(shape) * (w["hada_w2_a"] @ w["hada_w2_b"]).reshape(shape)
    else:
        dim = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else dim
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        shape = weight.shape if weight.ndim == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2).reshape(shape)
    scale = w["alpha"].item() / dim if dim is not None and "alpha" in w else 1.0
    return updown.reshape(weight.shape) * scale


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a1111_rules_read_loha_and_lokr_as_peft_merged_them(adapted, kind):
    made = adapted(kind)
    unet_layers = [name for name in made.merged if name.startswith("lora_unet_")]
    assert len(unet_layers) > 100
    for name in unet_layers:
        original, delta = made.originals[name], made.merged[name] - made.originals[name]
        assert (a1111_updown(made.tensors, name, original) - delta).abs().max() <= 1e-5 * max(1.0, delta.abs().max().item()), name


def _lora_part(tensors, name, original):
    up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
    scale = tensors[f"{name}.alpha"].item() / down.shape[0]
    return original + scale * (up.flatten(1) @ down.flatten(1)).reshape(original.shape)


def test_metadata_names_lycoris_and_its_algorithm():
    from sdtune.export.metadata import lora_metadata
    from sdtune.recipe.lora import LoraSection
    from sdtune.trainable import network_args

    def metadata(**lora):
        args = network_args(LoraSection(**lora))
        return lora_metadata(
            base_model_version="sd_v1", prediction_type="epsilon", zero_terminal_snr=False, rank=4, alpha=4.0,
            resolution=512, steps=1, learning_rate=1e-4, num_images=1, seed=0, base_model_name="b", base_model_sha256="0",
            title="t", recipe_json="{}", trained_text_encoder=False, network_args=args)

    plain = metadata()
    assert plain["ss_network_module"] == "networks.lora" and json.loads(plain["ss_network_args"]) == {}
    loha = metadata(algorithm="loha", preset="locon", conv_rank=2)
    assert loha["ss_network_module"] == "lycoris.kohya"
    assert json.loads(loha["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "16.0"}
    assert json.loads(metadata(algorithm="lokr")["ss_network_args"]) == {"algo": "lokr"}
    dora = metadata(use_dora=True)
    assert dora["ss_network_module"] == "lycoris.kohya"
    assert json.loads(dora["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}


@pytest.mark.parametrize("setting", ["lora.use_dora=true", "lora.dropout=0.1", "lora.init=gaussian"])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_lora_only_settings_with_lycoris_are_one_paragraph_errors(setting, algorithm):
    from sdtune.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=rf"{setting.split('=')[0]}: .* belongs to lora.algorithm: lora, but lora.algorithm is {algorithm}"):
        load_recipe(None, [f"lora.algorithm={algorithm}", setting])
    load_recipe(None, ["lora.algorithm=lora", setting])  # fine for a LoRA


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_inspect_reads_the_file(adapted, kind, tmp_path):
    from safetensors.torch import save_file

    from sdtune.export.inspect import inspect_file, zero_update_layers

    unet, text_encoder = adapted(kind).unet, adapted(kind).text_encoder
    tensors = kohya_state_dict(unet, text_encoder, torch.float16, base_model_version="sd_v1")
    save_file(tensors, tmp_path / "x.safetensors", {"ss_v2": "False", "ss_base_model_version": "sd_v1"})
    report = inspect_file(tmp_path / "x.safetensors")
    text = report.text()
    layers = len(lora_layers(unet)) + len(lora_layers(text_encoder))
    assert f"{layers} layers" in text and "stray" not in text and "lacks" not in text, text
    assert {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[kind] in text
    assert ("dora_scale" in text) == (kind == "dora")  # the UI caveat of DoRA files
    assert zero_update_layers(tensors) == []


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_run_saves_resumes_and_exports_bit_exact(kind, tiny_v, small_dataset, tmp_path):
    """4 steps straight (checkpoint at 2) vs. resuming the step-2 checkpoint in another folder: the
    same file, bit for bit; the checkpoint holds the adapter's own tensors (DoRA's magnitude too)."""
    import shutil

    from safetensors.torch import load_file

    from sdtune.export.kohya import read_lora
    from sdtune.train import main

    algorithm, use_dora = KINDS[kind]

    def run(out, *flags):
        args = ["--recipe", "recipes/tiny_demo.yaml", *flags]
        for item in (f"model.path={tiny_v}", f"data.path={small_dataset}", f"data.cache_dir={tmp_path / 'cache'}",
                     f"output.dir={out}", "train.logger=none", "preview.prompts=[]", "data.validation_split=0",
                     "export.dtype=fp32", "train.deterministic=true", "train.batch_size=4", "train.max_steps=4",
                     "lora.preset=locon", "lora.conv_rank=2", f"lora.algorithm={algorithm}", f"lora.use_dora={use_dora}",
                     "checkpoint.every_steps=2"):
            args += ["--set", item]
        return main(args)

    straight = run(tmp_path / "a")
    saved = tmp_path / "a" / "checkpoints" / "tiny-demo" / "step-00000002"
    marker = {"dora": "lora_magnitude_vector", "loha": "hada_w2_b", "lokr": "lokr_w1"}[kind]
    assert any(marker in key for key in load_file(saved / "trainable.safetensors"))
    shutil.copytree(saved, tmp_path / "b" / "checkpoints" / "tiny-demo" / "step-00000002")
    resumed = run(tmp_path / "b", "--resume", "latest")
    assert resumed.steps == 4
    a, metadata = read_lora(straight.output)
    b, _ = read_lora(resumed.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metadata["ss_network_module"] == "lycoris.kohya" and json.loads(metadata["ss_network_args"])["algo"] == algorithm
    suffix = {"dora": ".dora_scale", "loha": ".hada_w1_a", "lokr": ".lokr_w1"}[kind]
    assert any(key.endswith(suffix) for key in a) and any(key.endswith("_conv1" + suffix) for key in a)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sample_reads_the_file_and_a_weight_scales_the_change(reduced_v1, adapted, kind, tmp_path):
    """`sdtune sample --lora` takes the file; at weight 0.5 a layer moves half way to peft's merged
    weight (the UIs' strength: W + m * (W' - W), for DoRA too)."""
    from safetensors.torch import save_file

    from sdtune.pipeline import read_lora_file

    made = adapted(kind)
    tensors = made.tensors
    save_file(tensors, tmp_path / "x.safetensors", {"ss_v2": "False"})
    assert read_lora_file(tmp_path / "x.safetensors").tensors.keys() == tensors.keys()
    save_file(tensors | {"lora_unet_conv_in.diff": torch.zeros(1)}, tmp_path / "full.safetensors")  # LyCORIS' "full" kind
    with pytest.raises(ValueError, match=r"not a LoRA sdtune reads \(found key 'lora_unet_conv_in.diff'\)"):
        read_lora_file(tmp_path / "full.safetensors")
    base_unet, base_te = copy.deepcopy(reduced_v1[0]), copy.deepcopy(reduced_v1[1])
    merge_lora(tensors, base_unet, base_te, multiplier=0.5)
    for path in lora_layers(made.unet):
        name = kohya_name("lora_unet_", path)
        original, merged = made.originals[name], made.merged[name]
        expected = original + 0.5 * (merged - original)
        assert (base_unet.get_submodule(path).weight - expected).abs().max() <= 1e-5 * max(1.0, merged.abs().max().item()), path


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sdxl_file_has_sgm_and_te1_te2_names_and_merges_as_peft(kind):
    """SDXL: the UNet by its SGM module names (as kohya writes SDXL files), the encoders lora_te1_ / lora_te2_;
    our merge of the file (SGM names resolved) equals peft's merge of every weight of the three models."""
    from sdtune.export.metadata import SDXL
    from sdtune.tiny import reduced_sdxl

    algorithm, use_dora = KINDS[kind]
    base = reduced_sdxl(seed=1)
    unet, _, te1, te2 = (copy.deepcopy(m) for m in base)
    add_lora(unet, 4, 3.0, 0.0, UNET_PRESETS["locon"], algorithm=algorithm, use_dora=use_dora)
    for te in (te1, te2):
        add_lora(te, 4, 3.0, 0.0, TE_TARGETS, algorithm=algorithm, use_dora=use_dora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (unet, te1, te2):
            for name, param in model.named_parameters():
                if param.requires_grad and "lora_magnitude_vector" not in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    tensors = kohya_state_dict(unet, te1, torch.float32, base_model_version=SDXL, text_encoder_2=te2)
    names = {key.split(".", 1)[0] for key in tensors}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names) and not any(n.startswith("lora_unet_down_blocks") for n in names)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    base_unet, _, base_te1, base_te2 = (copy.deepcopy(m) for m in base)
    merge_lora(tensors, base_unet, base_te1, text_encoder_2=base_te2)
    for peft_model, ours, original in ((unet, base_unet, base[0]), (te1, base_te1, base[2]), (te2, base_te2, base[3])):
        for layer in lora_layers(peft_model).values():
            layer.merge()
        adapter = ("lora_", "hada_", "lokr_")
        theirs = {k.replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if not any(a in k for a in adapter)}
        mine = ours.state_dict()
        assert theirs.keys() == mine.keys()
        worst = max((theirs[k] - mine[k]).abs().max().item() / max(1.0, theirs[k].abs().max().item()) for k in mine)
        assert worst < 1e-5, worst
        assert sum(not torch.equal(mine[k], v) for k, v in original.state_dict().items()) == len(lora_layers(peft_model))


def test_tucker_layers_merge_as_the_layers_run(reduced_v1, tmp_path):
    """LyCORIS' Tucker (use_tucker) 3x3 conv layers: a LoCon's lora_down (1x1), lora_mid (3x3
    core), lora_up (1x1) run as three convs in turn, and the merged weight must equal that chain;
    a LoHa's hada_t1/hada_t2 cores rebuild each factor as A1111's lyco_helpers.make_weight_cp does."""
    from safetensors.torch import save_file

    from sdtune.export.inspect import inspect_file
    from sdtune.export.lycoris import weight_delta
    from sdtune.pipeline import read_lora_file

    torch.manual_seed(0)
    unet, text_encoder = copy.deepcopy(reduced_v1[0]), copy.deepcopy(reduced_v1[1])
    conv = unet.down_blocks[0].resnets[0].conv1
    out_c, in_c, r, alpha = conv.out_channels, conv.in_channels, 4, 2.0
    locon = {"lora_down.weight": torch.randn(r, in_c, 1, 1), "lora_mid.weight": torch.randn(r, r, 3, 3),
             "lora_up.weight": torch.randn(out_c, r, 1, 1), "alpha": torch.tensor(alpha)}
    x = torch.randn(2, in_c, 16, 16, dtype=torch.float64)
    chain = torch.nn.functional.conv2d(x, locon["lora_down.weight"].double())
    chain = torch.nn.functional.conv2d(chain, locon["lora_mid.weight"].double(), padding=1)
    chain = torch.nn.functional.conv2d(chain, locon["lora_up.weight"].double()) * (alpha / r)
    delta = weight_delta(locon, conv.weight)
    assert delta.shape == conv.weight.shape
    merged_run = torch.nn.functional.conv2d(x, delta.double(), padding=1)
    assert (merged_run - chain).abs().max() < 1e-4 * chain.abs().max()

    def make_weight_cp(t, wa, wb):  # A1111 extensions-builtin/Lora/lyco_helpers.py, restated
        temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
        return torch.einsum("i j k l, i r -> r j k l", temp, wa)

    loha = {"hada_w1_a": torch.randn(r, out_c), "hada_w1_b": torch.randn(r, in_c), "hada_t1": torch.randn(r, r, 3, 3),
            "hada_w2_a": torch.randn(r, out_c), "hada_w2_b": torch.randn(r, in_c), "hada_t2": torch.randn(r, r, 3, 3),
            "alpha": torch.tensor(alpha)}
    expected = (make_weight_cp(loha["hada_t1"], loha["hada_w1_a"], loha["hada_w1_b"])
                * make_weight_cp(loha["hada_t2"], loha["hada_w2_a"], loha["hada_w2_b"])) * (alpha / r)
    torch.testing.assert_close(weight_delta(loha, conv.weight), expected)

    # In a file: sample reads it, the merge applies it, inspect names the kernel.
    name = kohya_name("lora_unet_", "down_blocks.0.resnets.0.conv1")
    save_file({f"{name}.{k}": v for k, v in locon.items()}, tmp_path / "tucker.safetensors", {"ss_v2": "False"})
    lora = read_lora_file(tmp_path / "tucker.safetensors")
    before = conv.weight.detach().clone()
    merge_lora(lora.tensors, unet, text_encoder, multiplier=0.5)
    torch.testing.assert_close(conv.weight.detach(), before + 0.5 * delta)
    assert "3x3 Tucker kernel" in inspect_file(tmp_path / "tucker.safetensors").text()
