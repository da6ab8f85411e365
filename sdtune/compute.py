"""What a run computes on: accelerate's setup for it, how many CPU threads each
process uses, and whether bf16 is native.

``accelerate launch`` sets ``OMP_NUM_THREADS=1`` for the processes it starts when
the user did not set it, so a run on a CPU would use one core of many. sdtune
uses every core it is given, split between the processes of the machine, unless
the user set ``OMP_NUM_THREADS`` (for ``accelerate launch``: in the launcher's own
environment, which the launched process can read in ``/proc/<parent>/environ``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from sdtune import zero
from sdtune.errors import UserError

ACCELERATE_CHILD = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` in every process it starts


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX). Without it,
    PyTorch's bf16 convolutions take a reference path (``benchmarks/precision.py``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parent_environment() -> dict[str, str] | None:
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return None
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def user_threads() -> int | None:
    """OMP_NUM_THREADS as the user set it (None: not set, or set only by accelerate's launcher)."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is not None and ACCELERATE_CHILD in os.environ:
        parent = _parent_environment()
        if parent is not None and "OMP_NUM_THREADS" not in parent:
            value = None  # the launcher's default, not the user's
    try:
        return max(1, int(value)) if value is not None else None
    except ValueError:
        return None


def set_threads(processes_on_machine: int) -> tuple[int, str]:
    """Give torch this process's share of the machine's cores; returns (threads, why)."""
    wanted = user_threads()
    if wanted is not None:
        threads, why = wanted, "OMP_NUM_THREADS"
    else:
        threads = max(1, available_cores() // max(1, processes_on_machine))
        why = f"{available_cores()} cores / {processes_on_machine} process{'es' if processes_on_machine > 1 else ''}"
    torch.set_num_threads(threads)
    return threads, why


def make_accelerator(mixed_precision: str, accumulation: int, logger: str, out_dir: Path, seed: int, deterministic: bool,
                     compile_backend: bool | str = False) -> Accelerator:
    """accelerate for this run (precision, accumulation, trackers), seeded; an
    impossible precision (or precision and compile pair) fails here, and a slow one is said."""
    diffusers_logging.disable_progress_bar()  # per-file "Loading weights" bars hide ours
    transformers_logging.disable_progress_bar()
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation, log_with=None if logger == "none" else logger,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    if compile_backend in (True, "inductor") and mixed_precision == "bf16" and accelerator.device.type == "cpu":
        raise UserError(
            "train.compile: inductor with train.mixed_precision: bf16 on a CPU would train a broken LoRA: torch's CPU "
            "inductor (torch 2.13) drops the gradients of most LoRA layers under bf16 autocast (32 of the tiny model's 56 "
            "got none), and the compiled bf16 step was slower than the uncompiled one at SD 1.5 width "
            "(docs/benchmarks.md). Set train.compile: false (at SD 1.5 width bf16 alone is the faster choice on a CPU with "
            "native bf16), or train.mixed_precision: no to compile in fp32")
    if mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16() and accelerator.is_local_main_process:
        print(f"sdtune: warning: this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}), where bf16 "
              "convolutions run far slower than fp32 (benchmarks/precision.py); set train.mixed_precision: no", file=sys.stderr)
    _check_engine(accelerator)
    threads, why = set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))  # torchrun's per-machine count
    if accelerator.is_local_main_process:
        engine = f", {accelerator.distributed_type.value}" if accelerator.distributed_type != DistributedType.NO else ""  # DDP: MULTI_GPU, MULTI_CPU
        print(f"sdtune: {threads} CPU thread(s) per process ({why}); {accelerator.num_processes} process(es) on {accelerator.device.type}{engine}")
    set_seed(seed, device_specific=True, deterministic=deterministic)
    return accelerator


def _check_engine(accelerator: Accelerator) -> None:
    """FSDP (version 1, torch's FullyShardedDataParallel) and DeepSpeed ZeRO stages 1 and 2
    run; FSDP2 is refused until a run under it is proven (docs/distributed.md). accelerate
    builds their plugin when asked, then runs plain DDP where the engine cannot run (FSDP
    on CPU processes), without a word; say so."""
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 1:
        raise UserError(
            "accelerate runs FSDP2 (fsdp_version: 2), which sdtune does not support yet: writing the results and checkpoints "
            "of its sharded weights is not proven. Train with FSDP version 1 (recipes/accelerate/fsdp.yaml) or DDP "
            "(recipes/accelerate/multi_gpu.yaml, or --processes N); docs/distributed.md says what each GPU then holds")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero.check_config(accelerator.state.deepspeed_plugin)
    if accelerator.distributed_type == DistributedType.FSDP:
        _check_fsdp_settings(accelerator.state.fsdp_plugin)
    for engine, variable in ((DistributedType.FSDP, "ACCELERATE_USE_FSDP"), (DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED")):
        asked = os.environ.get(variable, "").lower() in ("1", "true", "yes")
        if asked and accelerator.distributed_type != engine and accelerator.is_local_main_process:
            runs = "a single process" if accelerator.distributed_type == DistributedType.NO else accelerator.distributed_type.value
            print(f"sdtune: warning: {engine.value} was asked for, but accelerate runs {runs} "
                  f"on {accelerator.device.type}: every process holds the whole model and optimizer (docs/distributed.md)",
                  file=sys.stderr)


# The FSDP settings sdtune's sharded path is built on (docs/distributed.md, "FSDP"), as
# recipes/accelerate/fsdp.yaml sets them: (plugin attribute, config key, allowed values, why).
FSDP_SETTINGS = (
    ("sharding_strategy", "fsdp_sharding_strategy", ("FULL_SHARD", "SHARD_GRAD_OP"),
     "gradient clipping sums each process's slice of the gradients, which the other strategies keep on several processes"),
    ("state_dict_type", "fsdp_state_dict_type", ("SHARDED_STATE_DICT",),
     "checkpoints are each process's slice, which sdtune's resume reads"),
    ("use_orig_params", "fsdp_use_orig_params", (True,),
     "the optimizer, EMA and clipping work on the UNet's own parameters"),
)


def _check_fsdp_settings(plugin) -> None:
    for attribute, key, allowed, why in FSDP_SETTINGS:
        value = getattr(plugin, attribute)
        value = getattr(value, "name", value)  # torch's enums by name
        if value not in allowed:
            wanted = " or ".join(str(v).lower() if isinstance(v, bool) else v for v in allowed)
            raise UserError(f"the accelerate config's {key} is {value}; sdtune trains under FSDP with {wanted}: {why}. "
                            f"Set {key}: {wanted} (recipes/accelerate/fsdp.yaml does)")


def highest_on_any_process(value: int | list[int], accelerator) -> int | list[int]:
    """The largest of ``value`` over all processes (a flag any one of them raised), or of each
    of a list of values; one all-reduce, none with a single process."""
    if accelerator.num_processes == 1:
        return value
    flags = torch.tensor(value if isinstance(value, list) else [value], device=accelerator.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.tolist() if isinstance(value, list) else int(flags.item())
