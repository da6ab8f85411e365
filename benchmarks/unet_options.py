"""A LoRA training step of the UNet in fp32, bf16 autocast, channels-last and torch.compile, on this machine.

    python benchmarks/unet_options.py [--models tiny reduced] [--modes fp32 channels_last ...] [--steps 20] [--rounds 3]

For each model (``tiny``: the tiny test UNet at 64 px, batch 4; ``reduced``: SD
1.5's topology at reduced width, 256 px, batch 2) it builds one UNet with a rank-4
LoRA on the attention projections and times the bare step (forward, MSE loss,
backward, AdamW step) of an identical copy per mode, in rounds that alternate the
modes so that a busy machine slows all of them alike. ``compile`` is
``torch.compile`` (inductor, default mode) of the UNet; its first step, which
compiles, is reported apart (``aot_eager``: traced by AOT autograd, no code generated). ``bf16`` is what ``train.mixed_precision: bf16`` does to a
LoRA run: the frozen weights stored in bf16, the LoRA weights in fp32, the step under
``torch.autocast(bfloat16)``; it pays on CPUs with native bf16 (AVX512-BF16, AMX). Prints one JSON object: the median seconds per step
per mode, the ratio to fp32, the first step's loss per mode (the options must not
change it beyond float noise), how many of the LoRA-B weights got a gradient in that
step (all of them must), and the compile time.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

import torch

from sdtune.adapters import add_lora, trainable_parameters
from sdtune.tiny import reduced_sd, tiny_unet

MODES = ("fp32", "channels_last", "compile", "compile_channels_last", "bf16", "bf16_channels_last", "compile_bf16", "aot_eager_bf16")
WORK = {"tiny": (4, 8), "reduced": (2, 32)}  # (batch, latent side)


def build(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = tiny_unet() if model == "tiny" else reduced_sd("sd_v1")[0]
    add_lora(unet, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    return unet.train()


def prepared(base: torch.nn.Module, mode: str):
    unet = copy.deepcopy(base)
    if "channels_last" in mode:
        unet = unet.to(memory_format=torch.channels_last)
    if "bf16" in mode:
        for parameter in unet.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=1e-4)
    run = torch.compile(unet) if mode.startswith("compile") else unet
    run = torch.compile(unet, backend="aot_eager") if mode.startswith("aot_eager") else run  # autograd traced, no code generated
    return run, optimizer, "bf16" in mode


def step(unet, optimizer, bf16: bool, inputs, channels_last: bool) -> tuple[float, int]:
    """One step; returns the loss and how many LoRA-B weights got a non-zero gradient (all of
    them should: B starts at zero, so it is the only LoRA half with a gradient at step 1)."""
    latents, t, cond, target = inputs
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        prediction = unet(latents, t, cond, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(prediction.float(), target)
    loss.backward()
    with_grad = sum(int(p.grad is not None and bool(p.grad.any())) for name, p in unet.named_parameters() if "lora_B" in name)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), with_grad


def measure(model: str, modes: list[str], steps: int, rounds: int) -> dict:
    base = build(model)
    batch, side = WORK[model]
    generator = torch.Generator().manual_seed(1)
    cross = base.config.cross_attention_dim
    inputs = (torch.randn(batch, 4, side, side, generator=generator), torch.randint(0, 1000, (batch,), generator=generator),
              torch.randn(batch, 77, cross, generator=generator), torch.randn(batch, 4, side, side, generator=generator))
    runs, first_loss, with_grad, compile_s, times = {}, {}, {}, {}, {mode: [] for mode in modes}
    for mode in modes:
        runs[mode] = prepared(base, mode)
        start = time.perf_counter()
        first_loss[mode], with_grad[mode] = step(*runs[mode], inputs, "channels_last" in mode)
        compile_s[mode] = time.perf_counter() - start
    for _ in range(rounds):
        for mode in modes:
            for _ in range(steps):
                start = time.perf_counter()
                step(*runs[mode], inputs, "channels_last" in mode)
                times[mode].append(time.perf_counter() - start)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    return {
        "batch": batch, "latent_side": side, "s_per_step": {m: round(v, 5) for m, v in medians.items()},
        "ratio_to_fp32": {m: round(v / medians["fp32"], 3) for m, v in medians.items()},
        "first_step_loss": first_loss, "lora_b_with_gradient": with_grad,
        "lora_b": sum("lora_B" in name for name, _ in base.named_parameters()), "first_step_s": {m: round(v, 2) for m, v in compile_s.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(WORK), choices=list(WORK))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="fp32 comes first: the ratios are to it")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = ["fp32", *[m for m in args.modes if m != "fp32"]]
    results = {model: measure(model, modes, args.steps, args.rounds) for model in args.models}
    print(json.dumps({"benchmark": "unet_lora_step", "results": results, "threads": torch.get_num_threads(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
