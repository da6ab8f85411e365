"""What a ``.safetensors`` file is, and what a UI would drop or misread in it (``sdtune inspect``)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from sdtune.export import ldm_keys
from sdtune.export.checkpoint import configs_from_shapes, read_tensors, split_ldm
from sdtune.export import lycoris
from sdtune.export.kohya import PEFT_KEY, partial_sd2_attention
from sdtune.export.markers import flags_from_file
from sdtune.export.metadata import SDXL
from sdtune.export.sgm_checkpoint import configs_from_sgm_shapes, is_sgm, split_sgm
from sdtune.textual_inversion import embedding_lines, is_embedding

KOHYA_PARTS = lycoris.PARTS  # LoRA's, and DoRA's, LoHa's and LoKr's (LyCORIS keys)
KOHYA_KEY = re.compile(r"(lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(" + "|".join(re.escape(p) for p in KOHYA_PARTS) + ")")
ALGORITHM_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
# Module kinds a LoRA layer name belongs to, for the rank/alpha summary: first match wins.
MODULE_KINDS = (
    ("text encoder attention", re.compile(r"lora_te\d?_.*self_attn")),
    ("text encoder mlp", re.compile(r"lora_te\d?_.*mlp")),
    ("unet attention", re.compile(r"lora_unet_.*attn[12]_")),
    ("unet feed-forward", re.compile(r"lora_unet_.*_ff_net_")),
    ("unet transformer proj_in/out", re.compile(r"lora_unet_.*_proj_(in|out)$")),
    ("unet conv / resnet (LoCon)", re.compile(r"lora_unet_")),
)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines + [f"warning: {w}" for w in self.warnings])


def inspect_file(path: str | Path, allow_pickle: bool = False) -> Report:
    path = Path(path)
    tensors, metadata = read_tensors(path, allow_pickle)
    if any("lora_" in key for key in tensors):
        return _lora_report(path, tensors, metadata)
    if is_embedding(tensors):
        return Report(embedding_lines(path, tensors, metadata))
    if is_sgm(tensors):
        return _sdxl_checkpoint_report(path, tensors, metadata)
    return _checkpoint_report(path, tensors, metadata)


def _lora_report(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Report:
    report = Report()
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    peft_layers, stray = set(), []
    for key, value in tensors.items():
        if match := KOHYA_KEY.fullmatch(key):
            layers[match.group(1)][match.group(2)] = value
        elif match := PEFT_KEY.fullmatch(key):
            peft_layers.add(match.group(1))
        else:
            stray.append(key)
    version = _lora_version(layers, peft_layers, tensors, metadata)
    fmt = "kohya" if layers and not peft_layers else "PEFT/diffusers (dotted names)" if peft_layers and not layers else "mixed kohya + PEFT"
    algorithms = sorted({lycoris.algorithm(parts) for parts in layers.values()} - {"lora", "unknown"})
    if algorithms:
        fmt += f" with LyCORIS {'/'.join(ALGORITHM_NAMES[a] for a in algorithms)}"
    report.lines += [
        f"{path.name}: LoRA, {fmt} keys, {len(layers) + len(peft_layers)} layers",
        f"base model: {_VERSION_NAMES.get(version, 'unknown (SD 1, SD 2 or SDXL?)')}",
        f"prediction type: {metadata.get('modelspec.prediction_type', 'not stated')}"
        + (f", zero terminal SNR: {metadata['sdtune.zero_terminal_snr']}" if "sdtune.zero_terminal_snr" in metadata else ""),
    ]
    summary: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for name, parts in layers.items():
        kind = next(k for k, pattern in MODULE_KINDS if pattern.match(name)) if name.startswith(("lora_unet_", "lora_te")) else "other"
        counts[kind] += 1
        algorithm = lycoris.algorithm(parts)
        if algorithm == "unknown":
            missing = "lora_up" if "lora_down.weight" in parts else "lora_down" if "lora_up.weight" in parts else "its weights"
            report.warnings.append(f"{name} lacks {missing}; the UIs skip it")
            continue
        rank = lycoris.rank(parts)
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        kernel = parts.get("lora_mid.weight", parts.get("lora_down.weight"))  # a Tucker LoCon keeps it in lora_mid
        shape = "x".join(str(s) for s in kernel.shape[2:]) if kernel is not None else ""
        shape += " Tucker" if "lora_mid.weight" in parts else ""
        summary[kind].add(("" if algorithm == "lora" else f"{ALGORITHM_NAMES[algorithm]} ")
                          + (f"rank {rank}" if rank is not None else "full matrices (scale 1)")
                          + f", alpha {alpha if alpha is not None else 'missing'}" + (f", {shape} kernel" if shape else ""))
    for kind in sorted(counts):
        report.lines.append(f"  {kind}: {counts[kind]} layers; " + "; ".join(sorted(summary[kind])))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    report.lines.append(f"dtypes: {', '.join(dtypes)}")
    _metadata_lines(report, metadata)

    if peft_layers:
        report.warnings.append(
            f"{len(peft_layers)} layers have PEFT/diffusers dotted names (e.g. {sorted(peft_layers)[0]}.lora_A.weight): "
            "A1111 drops them all and ComfyUI drops every UNet attention layer; convert with `sdtune export lora`"
        )
    dora = [n for n, p in layers.items() if "dora_scale" in p]
    if dora:
        report.warnings.append(
            f"{len(dora)} DoRA layers (dora_scale, e.g. {dora[0]}): LyCORIS applies them as trained; A1111 reads only "
            "input-axis dora_scale and stock ComfyUI normalises an output-axis one by the base weight (see docs/recipes.md, DoRA)"
        )
    no_alpha = [n for n, p in layers.items() if "alpha" not in p]
    if no_alpha:
        report.warnings.append(f"{len(no_alpha)} layers have no .alpha (e.g. {no_alpha[0]}): the UIs then scale by 1.0 (alpha = rank), whatever alpha it was trained with")
    if "ss_v2" not in metadata:
        report.warnings.append("no ss_v2 metadata: A1111 treats the LoRA as SD 1 and hides it while an SD 2 model is loaded")
    if version == SDXL:
        te = [n for n in layers if n.startswith("lora_te_")]
        if te:
            report.warnings.append(f"{len(te)} text-encoder layers are named lora_te_ (e.g. {te[0]}): A1111 drops them on SDXL; use lora_te1_ (CLIP-L) and lora_te2_ (bigG)")
        partial = partial_sd2_attention(layers, "lora_te2_")
        if partial:
            report.warnings.append(f"SDXL bigG (lora_te2_) with only part of q/k/v/out_proj adapted ({'; '.join(partial[:3])}): A1111 applies none of that layer's attention")
        upsamplers = [n for n in layers if re.fullmatch(r"lora_unet_up_blocks_\d+_upsamplers_0_conv", n)]
        if upsamplers:
            report.warnings.append(f"{upsamplers[0]} (diffusers name of an SDXL upsampler): A1111 maps it to the wrong block and drops it; kohya's SGM names (lora_unet_output_blocks_*) load everywhere")
    if version == "sd_v2":
        te1 = [n for n in layers if n.startswith("lora_te1_")]
        if te1:
            report.warnings.append(f"{len(te1)} text-encoder layers are named lora_te1_ (e.g. {te1[0]}): A1111 drops them on SD 2; use lora_te_")
        partial = partial_sd2_attention(n.replace("lora_te1_", "lora_te_") for n in layers)
        if partial:
            report.warnings.append(f"SD 2 text encoder with only part of q/k/v/out_proj adapted ({'; '.join(partial[:3])}): A1111 applies none of that layer's attention")
    if stray:
        report.warnings.append(f"{len(stray)} stray tensor(s) that are not LoRA weights (e.g. {stray[0]}): the UIs report them as keys not loaded")
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name in zero_update_layers(tensors):
        by_reason[_zero_reason(layers[name])].append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        report.warnings.append(f"{len(names)} of {len(layers)} layers change nothing ({reason}): {shown}; {_ZERO_WHY[reason]}")
    return report


def zero_update_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The layers of a kohya LoRA (``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) whose
    update ``alpha / rank * up @ down`` is exactly zero, sorted: exported and loaded, but they change nothing.

    A layer counts when its ``lora_up`` or its ``lora_down`` is all zeros, or its alpha is 0. Layers
    missing ``lora_up`` or ``lora_down`` are not counted (the UIs skip them; ``inspect`` warns apart).
    Other keys are ignored.
    """
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        if match := KOHYA_KEY.fullmatch(key):
            layers[match.group(1)][match.group(2)] = value
    return sorted(name for name, parts in layers.items() if _zero_reason(parts))


def _zero_reason(parts: dict[str, torch.Tensor]) -> str | None:
    if lycoris.algorithm(parts) != "lora":  # a DoRA's magnitude changes the weight even with lora_up = 0
        return None
    if not parts["lora_up.weight"].any():
        return "lora_up is all zeros"
    if not parts["lora_down.weight"].any():
        return "lora_down is all zeros"
    if "alpha" in parts and float(parts["alpha"]) == 0:
        return "alpha is 0"
    return None


_ZERO_WHY = {
    # lora_up starts at zero, so it stays zero in a layer that gets no gradient. Self-attention over a
    # 1x1 feature map (SD 1's middle block at 64 px) is one such layer: softmax over a single token is 1
    # whatever q and k are (in float, a ~1e-11 rounding residue that an fp16 export writes as 0).
    "lora_up is all zeros": (
        "they were adapted but got no gradient (e.g. self-attention q/k on a 1x1 feature map, as in SD 1's "
        "middle block at 64 px); train at a higher resolution or leave those layers out of the targets"
    ),
    "lora_down is all zeros": "the update up @ down is zero whatever lora_up holds; they were never trained or were zeroed",
    "alpha is 0": "both UIs scale the update by alpha / rank = 0; export with the alpha the LoRA was trained with",
}


_VERSION_NAMES = {
    "sd_v1": "SD 1.x (CLIP ViT-L, 768-d context)",
    "sd_v2": "SD 2.x (OpenCLIP ViT-H, 1024-d context)",
    SDXL: "SDXL 1.0 family (CLIP ViT-L + OpenCLIP ViT-bigG, 2048-d context)",
}


def _lora_version(layers, peft_layers, tensors, metadata) -> str | None:
    if metadata.get("ss_base_model_version") in _VERSION_NAMES:
        return metadata["ss_base_model_version"]
    if metadata.get("ss_base_model_version", "").startswith("sdxl") or any(n.startswith("lora_te2_") for n in layers):
        return SDXL
    if "ss_v2" in metadata:
        return "sd_v2" if metadata["ss_v2"] == "True" else "sd_v1"
    # The cross-attention key/value projections read the text encoder's width.
    for key, value in tensors.items():
        if re.search(r"attn2[._]to_[kv]", key) and ("lora_down" in key or "lora_A" in key):
            return {768: "sd_v1", 1024: "sd_v2", 2048: SDXL}.get(value.shape[1])
    return None


def _metadata_lines(report: Report, metadata: dict[str, str]) -> None:
    if not metadata:
        report.lines.append("metadata: none")
        return
    report.lines.append("metadata:")
    for key in sorted(metadata):
        value = metadata[key]
        if key == "sdtune.recipe" or len(value) > 120:
            value = f"<{len(value)} chars>" + (" (the resolved training recipe, JSON)" if key == "sdtune.recipe" else "")
        report.lines.append(f"  {key}: {value}")


def _checkpoint_report(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Report:
    report = Report()
    version, parts, ignored = split_ldm(tensors)
    prediction, ztsnr = flags_from_file(path, set(parts["markers"]), metadata)
    shapes = {k: tuple(v.shape) for part in parts.values() for k, v in part.items()}
    configs = configs_from_shapes(version, shapes, prediction)
    stored = json.loads(metadata.get("sdtune.architecture", "{}"))
    unet, te = configs["unet"], configs["text_encoder"]
    report.lines += [
        *_full_model_lines(path, tensors, "LDM", version, prediction, ztsnr),
        f"  unet: widths {unet['block_out_channels']}, {unet['layers_per_block']} layers per block, "
        f"context {unet['cross_attention_dim']}, {'linear' if unet['use_linear_projection'] else 'conv'} transformer projections",
        f"  text encoder: {te['num_hidden_layers']} layers used, width {te['hidden_size']}"
        + (f" (+{len([k for k in shapes if '.resblocks.' in k]) // 12 - te['num_hidden_layers']} unused OpenCLIP resblock)" if version == "sd_v2" else ""),
        f"  vae: widths {configs['vae']['block_out_channels']}",
    ]
    if stored:
        report.lines.append("  architecture details from sdtune metadata (heads, norm groups)")
    _prediction_in_the_uis(report, path, version, prediction, ztsnr)
    _metadata_lines(report, metadata)
    if ignored:
        report.warnings.append(_stray_warning(ignored))
    if prediction is None and version == "sd_v2":
        report.warnings.append(
            "SD 2 with no prediction-type marker: ComfyUI guesses eps/v from the weights and A1111 from a test run; "
            "`sdtune export checkpoint --prediction-type v|eps` rewrites it with markers"
        )
    return report


def _full_model_lines(path: Path, tensors: dict[str, torch.Tensor], layout: str, version: str, prediction, ztsnr) -> list[str]:
    """The first lines of a full model's report: what file, which base, what its markers say."""
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for k, t in tensors.items() if k not in ldm_keys.MARKER_KEYS})
    return [
        f"{path.name}: full model, single-file {layout} checkpoint, {len(tensors)} tensors ({', '.join(dtypes)})",
        f"base model: {_VERSION_NAMES[version]}",
        f"prediction type: {prediction or 'not stated'}; zero terminal SNR: {'not stated' if ztsnr is None else ztsnr}",
    ]


def _stray_warning(ignored: list[str]) -> str:
    return (f"{len(ignored)} stray tensor(s) outside the model (e.g. {ignored[0]}): EMA copies or training state; "
            "the UIs ignore them, they only take space")


def _sdxl_checkpoint_report(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Report:
    report = Report()
    parts, ignored = split_sgm(tensors)
    prediction, ztsnr = flags_from_file(path, set(parts["markers"]), metadata)
    configs = configs_from_sgm_shapes({k: tuple(v.shape) for part in parts.values() for k, v in part.items()})
    unet, te1, te2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
    report.lines += [
        *_full_model_lines(path, tensors, "SGM (SDXL)", SDXL, prediction, ztsnr),
        f"  unet: widths {unet['block_out_channels']}, {unet['layers_per_block']} layers per block, transformer depths "
        f"{[d if a.startswith('CrossAttn') else 0 for d, a in zip(unet['transformer_layers_per_block'], unet['down_block_types'])]}, "
        f"context {unet['cross_attention_dim']}, size/crop embedding {unet['projection_class_embeddings_input_dim']} wide",
        f"  text encoders: CLIP-L {te1['num_hidden_layers']} layers, width {te1['hidden_size']}; "
        f"OpenCLIP bigG {te2['num_hidden_layers']} layers, width {te2['hidden_size']}, projection {te2['projection_dim']}",
        f"  vae: widths {configs['vae']['block_out_channels']}",
    ]
    if "sdtune.architecture" in metadata:
        report.lines.append("  architecture details from sdtune metadata (heads, norm groups)")
    # Both UIs read the markers for SDXL-family files: ComfyUI's supported_models.SDXL.model_type (v_pred,
    # and ztsnr as sampling_settings["zsnr"]); A1111's sd_models_config picks sd_xl_v.yaml on v_pred.
    marked = "v_pred" in parts["markers"]
    if prediction == "v_prediction" and marked:
        zsnr = "ztsnr" in parts["markers"]
        report.lines.append(f"ComfyUI and A1111 (1.10+): the v_pred marker makes them run it as v-prediction{' (ComfyUI with zero terminal SNR, from ztsnr)' if zsnr else ''}")
        if zsnr:
            report.lines.append('A1111/Forge: if images look washed out, set "Noise schedule for sampling" to Zero Terminal SNR')
    elif prediction == "v_prediction":
        report.warnings.append(
            f"v-prediction is stated, but there is no v_pred tensor: ComfyUI and A1111 run this SDXL model as epsilon; "
            f"`sdtune export checkpoint {path.name} NEW.safetensors --prediction-type v{' --zero-terminal-snr' if ztsnr else ''}` writes it"
        )
    if ztsnr and "ztsnr" not in parts["markers"]:
        report.warnings.append("zero terminal SNR is stated, but there is no ztsnr tensor: ComfyUI samples it without; re-export with --zero-terminal-snr")
    _metadata_lines(report, metadata)
    if ignored:
        report.warnings.append(_stray_warning(ignored))
    return report


def _prediction_in_the_uis(report: Report, path: Path, version: str, prediction: str | None, ztsnr: bool | None) -> None:
    """How ComfyUI and A1111 run this file's prediction type, and whether the sidecars sdtune writes for them
    (``<stem>.comfyui.json``, ``<stem>.yaml``; DESIGN rule 6) are there and agree with the file."""
    v, zsnr = prediction == "v_prediction", bool(ztsnr)
    workflow, config = path.with_name(f"{path.stem}.comfyui.json"), path.with_suffix(".yaml")
    needs = ("v-prediction" if v else "epsilon") + (" with zero terminal SNR" if zsnr else "")
    rewrite = f"`sdtune export checkpoint {path.name} NEW.safetensors --prediction-type v{' --zero-terminal-snr' if zsnr else ''}`"
    if v or zsnr:
        # ComfyUI reads the v_pred/ztsnr markers only in supported_models.SDXL.model_type (which also sets
        # sampling_settings["zsnr"], the only way zsnr reaches model_sampling.ModelSamplingDiscrete). SD15 keeps
        # supported_models_base.BASE.model_type, always ModelType.EPS; SD20.model_type guesses V_PREDICTION when
        # the std of output_blocks.11.1.transformer_blocks.0.norm1.bias is above 0.09.
        does = (
            "loads this SD 1 checkpoint as epsilon" + (" without zero terminal SNR" if zsnr else "")
            if version == "sd_v1"
            else "guesses epsilon or v for this SD 2 checkpoint from its weights" + (" and never uses zero terminal SNR" if zsnr else "")
        ) + " (it reads the v_pred/ztsnr markers only for SDXL-family models)"
        matches = _workflow_matches(workflow, "v_prediction" if v else "eps", zsnr)
        if matches:
            report.lines.append(f"ComfyUI: {does}, but this model is {needs}: use {workflow.name} beside it, whose ModelSamplingDiscrete node sets that")
        elif matches is None:
            fix = f"{rewrite} writes it" if v else "add a ModelSamplingDiscrete node (sampling eps, zsnr on) after the checkpoint loader"
            report.warnings.append(
                f"ComfyUI {does}, but this model is {needs}; the workflow that sets that ({workflow.name}, a ModelSamplingDiscrete node) is missing; {fix}"
            )
        else:
            report.warnings.append(f"ComfyUI {does}, but this model is {needs}, and {workflow.name} beside it does not set that; {rewrite} rewrites it")
    # A1111 loads <stem>.yaml as the model config when it exists (modules/sd_models_config.py); without it, SD 1
    # gets v1-inference.yaml (epsilon) and SD 2 a guess from a test forward pass.
    said = _yaml_parameterization(config)
    if said == "unreadable":
        report.warnings.append(f"{config.name} beside it is not an LDM config (model.params); A1111 fails to load the checkpoint with it; delete it")
    elif said is not None and prediction is not None and said != ("v" if v else "eps"):
        fix = f"{rewrite} rewrites it" if v else "delete it"
        report.warnings.append(f"{config.name} beside it says parameterization {said!r} and A1111 follows it, but this model is {needs}; {fix}")
    elif said == "v":
        report.lines.append(f'A1111/Forge: read the model config from {config.name} beside it (parameterization "v"): use it, and keep it next to the checkpoint')
    elif said is None and v:
        a1111 = "A1111 runs this SD 1 checkpoint as epsilon" if version == "sd_v1" else "A1111 guesses epsilon or v for this SD 2 checkpoint from a test run"
        report.warnings.append(f'{a1111} unless {config.name} beside it says parameterization "v"; it is missing; {rewrite} writes it')
    if zsnr:
        report.lines.append('A1111/Forge: no file can say zero terminal SNR; set "Noise schedule for sampling" to Zero Terminal SNR in the settings')


def _workflow_matches(path: Path, sampling: str, zsnr: bool) -> bool | None:
    """Whether a ComfyUI workflow (API format) samples with these settings; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        nodes = json.loads(path.read_text(encoding="utf-8")).values()
        settings = [n["inputs"] for n in nodes if isinstance(n, dict) and n.get("class_type") == "ModelSamplingDiscrete"]
    except (ValueError, AttributeError, KeyError):
        return False
    return any(s.get("sampling") == sampling and bool(s.get("zsnr")) == zsnr for s in settings)


def _yaml_parameterization(path: Path) -> str | None:
    """The parameterization an A1111 ``<stem>.yaml`` gives (LDM's default is eps); None when there is no such file."""
    if not path.is_file():
        return None
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["params"]
        return str(params.get("parameterization", "eps"))
    except (yaml.YAMLError, TypeError, KeyError, AttributeError):
        return "unreadable"
