"""fp32 against bf16 autocast for the UNet's convolutions on this machine.

    python benchmarks/precision.py [--repeats 5]

Times forward + backward of a 3x3 convolution (batch 4) at the sizes the tiny
model's first levels run at, in fp32, under bf16 autocast (what
``train.mixed_precision: bf16`` does), and under bf16 autocast with
channels-last tensors. Prints one JSON object: the median milliseconds per
shape and mode, and whether oneDNN has native bf16 on this CPU
(``native_bf16``); without it, bf16 convolutions take a slow path.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

import torch

from sdtune.compute import cpu_has_native_bf16

SHAPES = [(32, 64), (64, 32), (32, 96)]  # (channels, side): 512 px and 768 px latents at the tiny model's widths
MODES = ("fp32", "bf16_autocast", "bf16_autocast_channels_last")


def time_conv(channels: int, side: int, mode: str, repeats: int) -> float:
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(4, channels, side, side)
    if mode.endswith("channels_last"):
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            y = conv(x)
        y.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {f"c{c}_s{s}": {mode: round(time_conv(c, s, mode, args.repeats), 2) for mode in MODES} for c, s in SHAPES}
    print(json.dumps({
        "benchmark": "conv3x3_fwd_bwd_ms", "results": results, "native_bf16": cpu_has_native_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
