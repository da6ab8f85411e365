"""The CPU a run computes on: how many threads each process uses, and whether bf16 is native.

``accelerate launch`` sets ``OMP_NUM_THREADS=1`` for the processes it starts when
the user did not set it, so a run on a CPU would use one core of many. sdtune
uses every core it is given, split between the processes of the machine, unless
the user set ``OMP_NUM_THREADS`` (for ``accelerate launch``: in the launcher's own
environment, which the launched process can read in ``/proc/<parent>/environ``).
"""

from __future__ import annotations

import os

import torch

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
