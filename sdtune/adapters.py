"""LoRA adapters (and DoRA, LoHa, LoKr) through peft's own API (``inject_adapter_in_model``).

Not through diffusers' / transformers' ``add_adapter`` mixins: those gate on the
installed peft version (transformers 5.25 demands a peft that did not exist yet),
while peft injects the same layers into any ``nn.Module`` with no gate.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER = "default"

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
# kohya's LoCon set: every Linear/Conv2d of the transformer, resnet and resampling
# blocks (not conv_in/conv_out or the time embedding MLP).
_BLOCKS = ["proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
UNET_PRESETS = {
    "attention": _ATTENTION,
    "attention+ff": _ATTENTION + _FEED_FORWARD,
    "locon": _ATTENTION + _FEED_FORWARD + _BLOCKS,
}
INITS = {"default": True, "gaussian": "gaussian"}  # both start with lora_up = 0: the model starts as the base
# LyCORIS' algorithms as peft implements them; each starts with a zero update too (LoHa's
# hada_w2_b, LoKr's w1 start at 0). Their dropout is rank/module dropout, not lora.dropout.
ALGORITHMS = {"lora": LoraConfig, "loha": LoHaConfig, "lokr": LoKrConfig}


def add_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    init: str = "default",
    exclude: list[str] | None = None,
    algorithm: str = "lora",
    use_dora: bool = False,
) -> list[str]:
    """Freeze ``model`` and add a trainable LoRA to every module whose name ends in a target
    (but the modules named in ``exclude``, by their full path).

    Convolutions with a kernel larger than 1x1 get ``conv_rank``/``conv_alpha``
    when given (kohya's conv_dim/conv_alpha). Returns the adapted module names.
    peft scales the update by ``alpha / rank``, the same rule kohya and both UIs
    use, so the alpha is exported unchanged. ``algorithm`` ``loha`` / ``lokr`` adds
    peft's LoHa / LoKr layers instead (LyCORIS' algorithms; ``dropout`` must then be 0);
    ``use_dora`` makes a LoRA a DoRA (Liu et al. 2024: a trained magnitude per output
    channel times the normalised ``W + BA``).
    """
    model.requires_grad_(False)
    rank_pattern, alpha_pattern = {}, {}
    if conv_rank is not None or conv_alpha is not None:
        for name, module in model.named_modules():
            wide_conv = isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
            if wide_conv and any(name == t or name.endswith("." + t) for t in target_modules):
                rank_pattern[re.escape(name)] = conv_rank or rank
                alpha_pattern[re.escape(name)] = conv_alpha or alpha
    common = dict(r=rank, target_modules=target_modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  exclude_modules=exclude or None)
    if algorithm == "lora":
        config = LoraConfig(lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=INITS[init], use_dora=use_dora, **common)
    elif use_dora or dropout or init != "default":
        raise ValueError(f"{algorithm} takes no use_dora, dropout or init (those are LoRA's)")
    else:
        config = ALGORITHMS[algorithm](alpha=alpha, init_weights=True, **common)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:
        raise ValueError(f"LoRA target modules {target_modules} matched no layer of {type(model).__name__}: {exc}") from None
    return list(lora_layers(model))


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer | LycorisLayer]:
    """Adapted modules (LoRA/DoRA, LoHa or LoKr) by their path in ``model`` (the path of the layer they wrap)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, (LoraLayer, LycorisLayer))}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def adapters_off(*models):
    """The peft adapters of ``models`` (None skipped) switched off, so they run as the base
    model, and back on after; each parameter's ``requires_grad`` is as it was (peft's switch
    sets it)."""
    layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(param, param.requires_grad) for layer in layers for param in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in flags:
            param.requires_grad_(flag)


class FirstStepGradients:
    """Once, as the first optimizer step begins: adapter layers none of whose trainable weights got
    a non-zero gradient would end the run unchanged (the end-of-run check says so of the file);
    say so while the run can still be stopped. A layer counts as alive when any of its weights got
    one (at step 1 a LoRA's down weights have none: its up weights start at zero); under FSDP,
    on any process, as each holds the gradients of its slice of the weights only. DeepSpeed moves
    each gradient into its own partitions as it is made, so under it they are looked at then.
    Make it before ``prepare``; ``attach`` the optimizer whose step the check precedes."""

    def __init__(self, models, accelerator, deepspeed: bool):
        self.accelerator, self.handles, self.alive = accelerator, [], set()
        layers = {name: [p for p in module.parameters() if p.requires_grad] for model in models if model is not None
                  for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
        self.layers = {name: params for name, params in layers.items() if params}
        if deepspeed:  # these hooks run before DeepSpeed's own, which take the gradients away
            self.handles = [p.register_post_accumulate_grad_hook(lambda param, name=name: self._see(name, param))
                            for name, params in self.layers.items() for p in params]

    def _see(self, name: str, param: torch.nn.Parameter) -> None:
        if param.grad is not None and bool(param.grad.any()):
            self.alive.add(name)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if self.layers:
            self.handles.append(optimizer.register_step_pre_hook(self._check))

    def _check(self, _optimizer, _args, _kwargs) -> None:
        from sdtune.compute import highest_on_any_process

        for handle in self.handles:
            handle.remove()
        alive = [int(name in self.alive or any(p.grad is not None and bool(p.grad.any()) for p in params))
                 for name, params in self.layers.items()]
        dead = [name for name, live in zip(self.layers, highest_on_any_process(alive, self.accelerator)) if not live]
        if dead and self.accelerator.is_main_process:
            print(f"sdtune: warning: {len(dead)} of {len(self.layers)} adapter layers got no gradient in step 1, so training "
                  f"cannot change them, e.g. {', '.join(dead[:2])}. Something cuts them off from the loss (a compiled "
                  "model, a hook, a layer the model does not use); stop the run and check (docs/reliability.md)", file=sys.stderr)
