"""Whole models out of sharded training (FSDP, DeepSpeed ZeRO-3), for what needs every
weight at once: the result files, step exports and previews.

Under FSDP each process holds a slice of every trained weight (under ZeRO-3 a
partition of every weight, gathered by ``zero.gather``), so the modules the
run trains cannot be written or drawn from as they are. Before they are wrapped,
``ModelView`` takes a skeleton of each trained model (its structure, with the
parameters on the meta device: no memory); when a whole model is needed, every
process takes part in gathering the full state dict (FSDP's ``FULL_STATE_DICT`` on
the main process only, on GPUs into its CPU memory) and the main
process loads it into the skeleton. Without sharding (one process, DDP, ZeRO-1/2)
the view is the unwrapped models themselves and nothing is gathered.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from sdtune import zero
from sdtune.errors import UserError
from sdtune.optim import ELEMENTWISE_OPTIMIZERS, SLICE_UNSAFE_OPTIMIZERS

# sdtune's FSDP checkpoint folder: each process's slices of the weights that train and of their
# optimizer state (torch's distributed checkpoint format); a LoRA's frozen base is not in it.
TRAINED_FOLDER = "fsdp_trained"
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)

DDP_INSTEAD = "train without FSDP: on one process, or with DDP (recipes/accelerate/multi_gpu.yaml, or launch.sh train --processes N)"


# What torch says each time FSDP1's state dicts are taken: the API is being replaced by
# FSDP2's (which sdtune does not use yet, docs/distributed.md); nothing a user can act on.
TORCH_NOTICES = (
    "Please use DTensor instead and we are deprecating ShardedTensor",
    r"FSDP.state_dict_type\(\) and FSDP.set_state_dict_type\(\) are being deprecated",
    "`load_state_dict` is deprecated",
    "`_get_pg_default_device` will be deprecated",
    "Multiple backends are registered with this ProcessGroup",
)


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _check_shardable(models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """What sdtune shards: the UNet, alone, with weights that train, with an optimizer that
    works on slices."""
    kind = type(optimizer).__name__
    if kind not in ELEMENTWISE_OPTIMIZERS:
        name, why = SLICE_UNSAFE_OPTIMIZERS.get(kind, (kind, "it is not known to work on FSDP's flat slices"))
        raise UserError(f"train.optimizer: {name} cannot train under FSDP: {why}. Set train.optimizer: adamw (under "
                        f"FSDP each GPU holds 1/N of its state: docs/distributed.md) or lion, or {DDP_INSTEAD}")
    zero.check_unet_only(models, "FSDP", "accelerate saves an FSDP optimizer's state with the first model alone, so the "
                         "checkpoints of a run that also trains the text encoder would lose its part", DDP_INSTEAD)


def skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory) and whose
    buffers are CPU copies (they are small, and non-persistent ones are in no state dict)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    memo |= {id(b): b.detach().to("cpu", copy=True) for b in module.buffers()}
    return copy.deepcopy(module, memo)


class ModelView:
    """The trained models (``{"unet": ..., "text_encoder": ...}``) as whole modules. Build it
    before ``accelerator.prepare``; call ``attach`` with the prepared models after it."""

    def __init__(self, models: dict[str, torch.nn.Module], optimizer, accelerator, settings: zero.Settings | None = None):
        self.accelerator, self.models = accelerator, models
        self.sharded, self.deepspeed = is_sharded(accelerator), zero.is_deepspeed(accelerator)
        # The run's precision: under DeepSpeed accelerate's says "no" once sdtune has set DeepSpeed up (zero.configure).
        self.precision = accelerator.mixed_precision
        # ZeRO-3 partitions the weights as FSDP does: whole models are gathered into skeletons.
        self.zero3 = self.deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
        self.gathers = self.sharded or self.zero3
        if self.deepspeed:  # DeepSpeed steps inside backward; ZeRO-1/2 keep whole weights on every process, as DDP
            zero.check_trainable(models, optimizer, accelerator.state.deepspeed_plugin, self.precision, settings.ema)
            zero.configure(accelerator, settings.batch_size, settings.accumulation, settings.max_grad_norm)
        # The weights that train (DeepSpeed puts flat partitions of them into the optimizer's groups).
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.sharded:
            _check_shardable(models, optimizer)
            for notice in TORCH_NOTICES:
                warnings.filterwarnings("ignore", message=notice)
        self.skeletons = {name: skeleton(m) for name, m in models.items()} if self.gathers else {}
        for module in self.skeletons.values():  # previews run them as accelerate runs the prepared models
            zero.autocast_forward(module, accelerator.device, self.precision)
        self.prepared: dict[str, torch.nn.Module] = {}  # set by attach
        self.schedule = None  # the prepared learning-rate schedule, set by attach
        self.unwrapped: dict[str, torch.nn.Module] = {}
        self.optimizer = optimizer
        if self.sharded and accelerator.num_processes > 1:
            # Every process starts from the main process's trained weights, as DDP makes them (a
            # LoRA's random init is seeded per process); FSDP then keeps each process's slice.
            # (FSDP's sync_module_states would too, but torch refuses it for CPU processes;
            # DeepSpeed broadcasts them itself, ZeRO-3 before partitioning.)
            with torch.no_grad():
                for module in models.values():
                    for param in module.parameters():
                        if param.requires_grad:
                            torch.distributed.broadcast(param.data, src=0)

    def attach(self, prepared: list[torch.nn.Module], schedule) -> tuple[dict[str, torch.nn.Module], list[torch.nn.Parameter]]:
        """Record the prepared models (in the order of ``models``) and learning-rate schedule;
        returns the models unwrapped (the modules the run trains: under FSDP each holds its
        process's slice of the weights), and the parameters that train (under FSDP, their slices)."""
        self.prepared, self.schedule = dict(zip(self.models, prepared, strict=True)), schedule
        self.unwrapped = {name: self.accelerator.unwrap_model(m) for name, m in self.prepared.items()}
        if self.deepspeed:
            zero.load_safely(self.prepared["unet"])
            zero.autocast_forward(self.unwrapped["unet"], self.accelerator.device, self.precision)
        else:  # accelerate's FSDP preparation puts the sharded parameters into the optimizer's groups
            self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return self.unwrapped, self.params

    def autocast(self):
        """The run's autocast for previews: accelerate's, except under DeepSpeed, where accelerate's
        does nothing (``zero``: sdtune's own autocast runs the UNet there)."""
        if self.deepspeed and self.precision == "bf16":
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def save_trained(self, checkpoint: Path) -> None:
        """Write this process's slices of the weights that train and of their optimizer state into
        ``checkpoint/TRAINED_FOLDER`` (every process). accelerate's FSDP save would write every
        weight's slice, a LoRA's frozen base too: a LoRA checkpoint would hold the whole UNet."""
        model = self.prepared["unet"]
        state = {"model": get_model_state_dict(model, options=TRAINED_ONLY)}
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            state["optimizer"] = FSDP.optim_state_dict(model, self.optimizer)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(Path(checkpoint) / TRAINED_FOLDER)))

    def load_trained(self, checkpoint: Path) -> None:
        """Load what ``save_trained`` wrote (every process), its metadata checked first (torch
        unpickles it). The optimizer's state is read with torch's loader for FSDP optimizer state,
        which takes its template from the checkpoint's metadata: accelerate 1.16's takes it from the
        optimizer, which holds no state before the first step, so nothing is loaded, without a word,
        and a resumed run restarts AdamW's moments."""
        model, optimizer, folder = self.prepared["unet"], self.optimizer, Path(checkpoint) / TRAINED_FOLDER
        check_metadata(folder)
        reader = dcp.FileSystemReader(str(folder))
        trained = get_model_state_dict(model, options=TRAINED_ONLY)
        try:
            dcp.load({"model": trained}, storage_reader=reader, planner=_WeightsOnlyPlanner())
            # Loaded with every other weight's slice as it is, so that FSDP finds them all.
            set_model_state_dict(model, get_model_state_dict(model) | trained)
            with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
                state = load_sharded_optimizer_state_dict(model_state_dict=model.state_dict(), optimizer_key="optimizer",
                                                          storage_reader=reader, planner=_WeightsOnlyPlanner())
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state["optimizer"]))
        except CheckpointException as exc:  # torch wraps the processes' failures in one (a BaseException): the first
            raise next((e for e, _ in exc.failures.values() if isinstance(e, Exception)), RuntimeError(str(exc))) from None

    def whole(self) -> dict[str, torch.nn.Module] | None:
        """The models with all their current weights, on the main process (None on the
        others). Sharded, every process must call it at the same point of the run."""
        if not self.gathers:
            return self.unwrapped if self.accelerator.is_main_process else None
        gathered = self._gather()
        if gathered is None:
            return None
        for name, state in gathered.items():
            self.skeletons[name].load_state_dict(state, strict=True, assign=True)
        return self.skeletons

    def for_preview(self, ema, params: list[torch.nn.Parameter]):
        """``(models, ema)`` to draw previews with, on the main process, ``(None, None)`` on the
        others. ``ema`` is what ``evaluation.preview_grid`` swaps the EMA weights in with: the
        run's EMA model, or, sharded, one that loads the gathered EMA weights into the gathered
        models (every process takes part in gathering both)."""
        if not self.gathers:
            return (self.unwrapped, ema) if self.accelerator.is_main_process else (None, None)
        ema_weights = None
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
            try:
                ema_weights = self._gather()
            finally:
                ema.restore(params)
        models = self.whole()
        if models is None:
            return None, None
        return models, _SwapIn(models, ema_weights) if ema_weights is not None else None

    def _gather(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Every process: the full state dicts of the prepared models, on the main process."""
        if self.zero3:
            return zero.gather(self.unwrapped, self.accelerator.is_main_process)
        # FSDP's full state dict on the main process only, as accelerate's get_state_dict takes it,
        # except that that offloads to the CPU even on CPU processes, where FSDP then returns
        # storage it has freed (a crash; torch 2.13): there the tensors are CPU tensors already.
        config = FullStateDictConfig(offload_to_cpu=self.accelerator.device.type != "cpu", rank0_only=True)
        gathered = {}
        for name, model in self.prepared.items():
            with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
                gathered[name] = model.state_dict()  # collective
        return gathered if self.accelerator.is_main_process else None


class _WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
    """torch's load planner, except that what a checkpoint holds besides tensors (the optimizer's
    settings: numbers, names) is read with ``torch.load(weights_only=True)``: torch 2.13's
    unpickles it with ``weights_only=False``, so a ``.distcp`` file could run code."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)  # plain values only, saved again for torch's reader
        checked.seek(0)
        super().load_bytes(read_item, checked)


# What torch's distributed checkpoint metadata (the ``.metadata`` file of each FSDP folder, a
# plain pickle that torch reads with ``pickle.load``) is made of, and nothing else may be.
DCP_METADATA = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = {
    (DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                                      "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in METADATA_GLOBALS and not dtype:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a distributed checkpoint's metadata")
        return super().find_class(module, name)


def check_metadata(folder: Path) -> None:
    """Read the ``.metadata`` of a distributed checkpoint ``folder`` as torch would, but allowing
    only what such metadata is made of, before torch unpickles it."""
    with open(Path(folder) / ".metadata", "rb") as handle:
        _MetadataUnpickler(handle).load()


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scale the gradients of ``params`` so that their global norm is at most ``max_norm``.
    Sharded, each process holds the gradients of its own slice of every weight, and each
    element lives on exactly one process (FULL_SHARD): the squared norms are summed over
    the processes. (accelerate's ``clip_grad_norm_`` takes FSDP's own only when ``params``
    are all of one model's parameters, a LoRA's are not, and otherwise clips every process
    by its own slice's norm.)"""
    if not is_sharded(accelerator):
        accelerator.clip_grad_norm_(params, max_norm)
        return
    accelerator.unscale_gradients()
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), device=accelerator.device, dtype=torch.float32)
    for grad in grads:
        squares += grad.detach().float().pow(2).sum()
    squares = accelerator.reduce(squares, "sum")
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))


def stored_dtype(accelerator, autocast_dtype: torch.dtype) -> torch.dtype:
    """The dtype the frozen weights are stored in: the autocast dtype (half the memory), except
    under FSDP, which flattens each unit's weights, frozen and trained, into one tensor of one
    dtype; they stay fp32 there and FSDP's mixed precision casts them for the computation."""
    return torch.float32 if is_sharded(accelerator) else autocast_dtype


class _SwapIn:
    """Swaps other weights into gathered models and back, with the calls of diffusers'
    ``EMAModel`` that ``preview_grid`` makes (``store``, ``copy_to``, ``restore``)."""

    def __init__(self, models: dict[str, torch.nn.Module], weights: dict[str, dict[str, torch.Tensor]]):
        self.models, self.weights, self.kept = models, weights, {}

    def store(self, _params) -> None:
        self.kept = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in self.models.items()}

    def copy_to(self, _params) -> None:
        for name, model in self.models.items():
            model.load_state_dict(self.weights[name], strict=True)  # copied into the tensors, wherever they are

    def restore(self, _params) -> None:
        for name, model in self.models.items():
            model.load_state_dict(self.kept[name], strict=True)
