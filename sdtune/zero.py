"""DeepSpeed ZeRO under accelerate (recipes/accelerate/deepspeed_zero2.yaml; stages 1 to 3).

Under ZeRO-1 and ZeRO-2 every process keeps the whole weights; the optimizer state (and
with stage 2 the gradients) is partitioned between the processes, and DeepSpeed's
engine does the step inside ``accelerator.backward``: it averages and clips the
gradients and runs the optimizer on each process's partition. So the results, step
exports and previews come from the unwrapped model as under DDP. ZeRO-3 partitions the
weights too: ``sharded.ModelView`` then gathers them into a skeleton (``gather``), as
under FSDP. The checkpoints are DeepSpeed's own (accelerate's ``save_state``: the
trained weights, each process's optimizer partition), read back with
``torch.load(weights_only=True)`` and DeepSpeed's record types allowed, never
unpickling anything else.

sdtune makes the optimizer and the learning-rate schedule itself and sets DeepSpeed's
batch size, accumulation and gradient clipping from the recipe, so the same recipe
trains the same model under DeepSpeed as under DDP. Mixed precision is sdtune's too:
DeepSpeed's own bf16 mode would cast the whole model to bf16 and feed it uncast inputs,
so DeepSpeed runs in fp32 and the UNet's forward under autocast, as accelerate runs it
without DeepSpeed (frozen weights stored in bf16, trained ones fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType, convert_outputs_to_fp32

from sdtune.errors import UserError
from sdtune.optim import ELEMENTWISE_OPTIMIZERS, SLICE_UNSAFE_OPTIMIZERS

DDP_INSTEAD = "train without DeepSpeed: on one process, or with DDP (recipes/accelerate/multi_gpu.yaml, or launch.sh train --processes N)"


@dataclass(frozen=True)
class Settings:
    """The recipe's values DeepSpeed's setup depends on."""

    batch_size: int
    accumulation: int
    max_grad_norm: float
    ema: bool


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def offloads_optimizer(plugin) -> bool:
    return plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def check_config(plugin) -> None:
    """At start-up: the DeepSpeed settings sdtune's path is built on. Under ZeRO-3 the base
    model is loaded whole (transformers would otherwise build the frozen text encoders
    partitioned, with ``deepspeed.zero.Init``, and nothing gathers their weights outside
    DeepSpeed's engine: the run would stop at the first caption it encodes)."""
    if plugin.zero_stage not in (1, 2, 3):
        raise UserError(f"the accelerate config's zero_stage is {plugin.zero_stage}; sdtune trains under DeepSpeed with "
                        "ZeRO stage 1, 2 or 3. Set zero_stage: 2 (recipes/accelerate/deepspeed_zero2.yaml)")
    if plugin.zero_stage == 3:
        from transformers.integrations import unset_hf_deepspeed_config

        plugin.zero3_init_flag = False
        unset_hf_deepspeed_config()
    for section, recipe_keys in (("optimizer", "train.optimizer and train.learning_rate"),
                                 ("scheduler", "train.lr_scheduler and train.lr_warmup_steps")):
        if section in plugin.deepspeed_config:
            raise UserError(
                f"the DeepSpeed config has an {section} section; sdtune makes the {section} from the recipe "
                f"({recipe_keys}). Remove the {section} section from the DeepSpeed config file")


# The DeepSpeed settings sdtune takes from the recipe: (DeepSpeed key, recipe key).
FROM_RECIPE = (("train_micro_batch_size_per_gpu", "train.batch_size"),
               ("gradient_accumulation_steps", "train.gradient_accumulation_steps"),
               ("gradient_clipping", "train.max_grad_norm"))


def configure(accelerator, batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """Before ``prepare``: DeepSpeed's batch size, accumulation and clipping from the recipe. A
    config file that sets one of them otherwise is refused, as is an accelerate that took
    another accumulation than the recipe's (from ``--gradient_accumulation_steps``)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for (key, recipe_key), value in zip(FROM_RECIPE, (batch_size, accumulation, float(max_grad_norm)), strict=True):
        current = config.get(key, "auto")
        if current != "auto" and float(current) != float(value):
            raise UserError(
                f"the DeepSpeed config sets {key}: {current} and the recipe {recipe_key}: {value}; sdtune sets DeepSpeed's "
                f"{key} from the recipe. Remove {key} from the DeepSpeed config (or the accelerate config's deepspeed_config) "
                f"and set {recipe_key} in the recipe")
        config[key] = value
    if accelerator.gradient_accumulation_steps != accumulation:
        raise UserError(
            f"accelerate accumulates over {accelerator.gradient_accumulation_steps} batches and the recipe's "
            f"train.gradient_accumulation_steps is {accumulation}; set it in the recipe only (not with accelerate "
            "launch --gradient_accumulation_steps or in the accelerate config)")
    config["train_batch_size"] = batch_size * accumulation * accelerator.num_processes
    config["bf16"] = {"enabled": False}  # sdtune's autocast instead (autocast_forward)


def autocast_forward(module: torch.nn.Module, device: torch.device, mixed_precision: str) -> None:
    """Run ``module``'s forward under autocast in the run's precision, with fp32 outputs, as
    accelerate's ``prepare`` does without DeepSpeed."""
    if mixed_precision == "bf16":
        module.forward = convert_outputs_to_fp32(torch.autocast(device.type, dtype=torch.bfloat16)(module.forward))


def check_trainable(models: dict[str, torch.nn.Module], optimizer, plugin, mixed_precision: str, ema: bool = False) -> None:
    """What sdtune trains under DeepSpeed: the UNet, alone, with an optimizer whose update is
    elementwise (DeepSpeed hands it flat partitions of the weights)."""
    kind, why = type(optimizer).__name__, None
    if kind not in ELEMENTWISE_OPTIMIZERS:
        name, why = SLICE_UNSAFE_OPTIMIZERS.get(kind, (kind, "it is not known to work on DeepSpeed's flat partitions"))
    elif kind != "AdamW" and offloads_optimizer(plugin):
        name, why = ELEMENTWISE_OPTIMIZERS[kind], ("with offload_optimizer_device: cpu accelerate replaces the optimizer "
                                                   "by DeepSpeed's CPU Adam, so it would train with Adam")
    if why is not None:
        raise UserError(f"train.optimizer: {name} cannot train under DeepSpeed: {why}. Set train.optimizer: adamw, or {DDP_INSTEAD}")
    check_unet_only(models, "DeepSpeed", "accelerate gives DeepSpeed one model per engine", DDP_INSTEAD)
    if ema and plugin.zero_stage == 3:
        raise UserError(
            "ema.enabled under DeepSpeed ZeRO-3: each process holds a partition of every weight, and the EMA sdtune keeps "
            "(diffusers' EMAModel) averages whole weights. Set ema.enabled: false, or zero_stage: 2 "
            "(recipes/accelerate/deepspeed_zero2.yaml), or train under FSDP (recipes/accelerate/fsdp.yaml), which keeps "
            "each process's slice of the EMA")
    if mixed_precision == "fp16":
        raise UserError("train.mixed_precision: fp16 under DeepSpeed is not supported by sdtune (its loss scaling is not "
                        "proven there). Set train.mixed_precision: bf16 (or no), or " + DDP_INSTEAD)


def check_unet_only(models: dict[str, torch.nn.Module], engine: str, why: str, instead: str) -> None:
    """Under FSDP and DeepSpeed sdtune trains weights of the UNet, and the UNet alone (``why``:
    what would go wrong with the text encoder too; ``instead``: what to do)."""
    if not any(p.requires_grad for p in models["unet"].parameters()):
        raise UserError(f"{engine} trains weights of the UNet, and this run trains none of them (textual inversion trains "
                        f"rows of the text encoder's embedding): {instead}")
    if len(models) > 1:
        raise UserError(f"under {engine} sdtune trains the UNet only: {why}. Set lora.text_encoder: false (LoRA) or "
                        f"train.full_text_encoder: false (full fine-tune), or {instead}")


# The DeepSpeed record types an optimizer partition file holds besides tensors and
# plain containers (ZeRO-2 and 3, DeepSpeed 0.19): its loss scaler, the ZeRO stage, and
# where each weight lies in the flat partition.
def _checkpoint_types() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_safely(engine) -> None:
    """Make ``engine`` read its checkpoints with ``torch.load(weights_only=True)`` (DeepSpeed's
    own loader unpickles anything), allowing only DeepSpeed's record types besides tensors."""
    allowed = _checkpoint_types()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def replay_cpu_adam_steps(accelerator) -> None:
    """After a resume (every process): bring DeepSpeed's CPU Adam (optimizer offload) to where an
    uninterrupted run's is. Its kernel keeps beta1^t and beta2^t as float products, one factor
    more each step; a resumed one starts them at ``pow(beta, step)``, which can differ in the
    last bit (in float32 for beta2 0.999 at steps 3 and 6), and the run would leave the
    trajectory by ~1e-10. Steps 1..N replayed on empty tensors build the products as the run
    did, and change no weight (the next real step sets the learning rate and the rest again)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = accelerator.deepspeed_engine_wrapped.engine.optimizer.optimizer
    if not isinstance(optimizer, DeepSpeedCPUAdam):
        return
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    if not steps:
        return
    group, empty = optimizer.param_groups[0], torch.empty(0)
    for step in range(1, max(steps) + 1):  # one C++ optimizer for all groups; each step advances it once
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], *group["betas"], group["eps"],
                                          group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)


def gather(models: dict[str, torch.nn.Module], is_main: bool) -> dict[str, dict[str, torch.Tensor]] | None:
    """Every process (ZeRO-3): the models' full state dicts on the CPU of the main process (None on
    the others), gathering one weight at a time so that no process holds a whole model."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    gathered = {}
    for name, model in models.items():
        state = {}
        for key, value in model.state_dict(keep_vars=True).items():
            partitioned = hasattr(value, "ds_id")  # a weight (buffers are whole)
            with GatheredParameters([value], modifier_rank=None) if partitioned else contextlib.nullcontext():  # collective
                if is_main:
                    state[key] = value.detach().to("cpu", copy=True)
        gathered[name] = state
    return gathered if is_main else None
