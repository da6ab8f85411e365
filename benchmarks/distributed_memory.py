"""GPU memory per GPU of a full UNet fine-tune, for each way of spreading it over GPUs.

    python benchmarks/distributed_memory.py [--arch sd_v1|sd_v2] [--table]

Builds the UNet from the config sdtune ships (sdtune/configs/<arch>.json) on the
meta device, so no weight is allocated, counts its parameters, and for 1, 2, 4
and 8 GPUs adds up what each GPU holds of the fp32 weights (4 bytes a
parameter), fp32 gradients (4) and the optimizer state: AdamW's two fp32
moments (8) or bitsandbytes' 8-bit AdamW's two 8-bit moments (2).

- ddp: every GPU holds all three.
- fsdp: FSDP FULL_SHARD, 1/N of all three.
- zero2: DeepSpeed ZeRO-2, whole weights, 1/N of gradients and optimizer state.
- zero2_offload: ZeRO-2 with the optimizer state in CPU RAM (zero2_offload_cpu_gib:
  per process). AdamW only: with offload accelerate swaps any optimizer for
  DeepSpeed's CPU Adam, whose moments are fp32.

Estimates from parameter and optimizer-state sizes only. Not counted:
activations (they grow with batch size and resolution; train.gradient_checkpointing
shrinks them), the frozen VAE and text encoder, each framework's working copies
and buffers (DDP's gradient buckets, FSDP's gathered unit, DeepSpeed's fp32 master
partition), the quantization statistics of 8-bit states, and the CUDA context.
Prints one JSON object, or with --table the Markdown tables of docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

GPUS = (1, 2, 4, 8)
STRATEGIES = ("ddp", "fsdp", "zero2", "zero2_offload")
WEIGHT_BYTES = GRAD_BYTES = 4  # fp32
STATE_BYTES = {"adamw": 8, "adamw8bit": 2}  # two moments a parameter: fp32, or 8-bit (bitsandbytes)
# With optimizer offload accelerate replaces the optimizer by DeepSpeed's CPU Adam (fp32 moments).
APPLIES = {"adamw": STRATEGIES, "adamw8bit": ("ddp", "fsdp", "zero2")}
GIB = 2**30


def meta_unet(arch: str):
    """The UNet of sdtune's shipped config for ``arch`` on the meta device: shapes, no memory."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.export.checkpoint import base_config

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(base_config(arch)["unet"])


def unet_parameters(arch: str) -> int:
    return sum(p.numel() for p in meta_unet(arch).parameters())


def gpu_bytes(params: int, gpus: int, strategy: str, optimizer: str) -> float:
    """Bytes of weights, gradients and optimizer state on each GPU."""
    weights, grads, states = WEIGHT_BYTES * params, GRAD_BYTES * params, STATE_BYTES[optimizer] * params
    if strategy == "ddp":
        return weights + grads + states
    if strategy == "fsdp":
        return (weights + grads + states) / gpus
    if strategy == "zero2":
        return weights + (grads + states) / gpus
    if strategy == "zero2_offload":
        return weights + grads / gpus
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")


def cpu_bytes(params: int, gpus: int, strategy: str, optimizer: str) -> float:
    """Bytes of optimizer state each process keeps in CPU RAM (only with offload)."""
    return STATE_BYTES[optimizer] * params / gpus if strategy == "zero2_offload" else 0.0


def estimate(arch: str) -> dict:
    params = unet_parameters(arch)
    gib = {
        optimizer: {
            str(n): {s: round(gpu_bytes(params, n, s, optimizer) / GIB, 2) for s in APPLIES[optimizer]}
            | ({"zero2_offload_cpu_gib": round(cpu_bytes(params, n, "zero2_offload", optimizer) / GIB, 2)}
               if "zero2_offload" in APPLIES[optimizer] else {})
            for n in GPUS
        }
        for optimizer in STATE_BYTES
    }
    return {"benchmark": "distributed_memory", "arch": arch, "unet_parameters": params, "unit": "GiB per GPU", "per_gpu": gib}


HEADINGS = {"ddp": "DDP", "fsdp": "FSDP FULL_SHARD", "zero2": "ZeRO-2", "zero2_offload": "ZeRO-2 + optimizer offload",
            "zero2_offload_cpu_gib": "offload: CPU RAM per process"}


def table(result: dict) -> str:
    lines = [f"UNet of {result['arch']}: {result['unet_parameters']:,} parameters; GiB per GPU"]
    for optimizer, rows in result["per_gpu"].items():
        columns = list(rows[str(GPUS[0])])
        lines += ["", f"{optimizer} ({STATE_BYTES[optimizer]} bytes of optimizer state a parameter):", "",
                  "| GPUs | " + " | ".join(HEADINGS[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |" for n, row in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd_v1", "sd_v2"], default="sd_v1", help="sd_v1: SD 1.5's UNet; sd_v2: SD 2.x's")
    parser.add_argument("--table", action="store_true", help="Markdown tables instead of JSON")
    args = parser.parse_args(argv)
    result = estimate(args.arch)
    print(table(result) if args.table else json.dumps(result))
    return result


if __name__ == "__main__":
    main()
