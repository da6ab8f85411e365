"""Sampling speed: images/s and seconds per sampler step, printed as JSON.

    python benchmarks/sample.py                      # the tiny model, 64x64, on the GPU if there is one
    python benchmarks/sample.py --model DIR --size 512 --steps 25 --batch 4

One warm-up generation first (kernel selection, allocator), then ``--repeats``
timed generations of ``--batch`` images through ``sdtune.samplers.generate``: text
encoding, ``--steps`` UNet evaluations with classifier-free guidance (a batch of
2x``--batch``) and the VAE decode. ``s_per_step`` is the whole generation's time
over its steps, so it includes that fixed overhead.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # run as a file: import sdtune from the checkout

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from sdtune.pipeline import load_pipeline
from sdtune.samplers import generate, make_sampler
from sdtune.tiny import make_tiny


def measure(model_dir: str, size: int, steps: int, batch: int, repeats: int, sampler: str) -> dict:
    model = load_pipeline(model_dir)
    device = model.pipe.device

    def run() -> float:
        scheduler = make_sampler(sampler, model.sampling_config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model.pipe, ["a red square on a grey background"] * batch, scheduler, steps, 7.0, 0.0,
                 list(range(batch)), (size, size))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()
    elapsed = sum(run() for _ in range(repeats))
    return {
        "benchmark": "sample",
        "model": Path(model_dir).name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "dtype": str(model.pipe.unet.dtype).removeprefix("torch."),
        "sampler": sampler,
        "size": f"{size}x{size}",
        "steps": steps,
        "batch": batch,
        "repeats": repeats,
        "images_per_s": round(batch * repeats / elapsed, 3),
        "s_per_step": round(elapsed / (repeats * steps), 5),
        "s_per_image": round(elapsed / (batch * repeats), 4),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers model folder (default: a fresh tiny model)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampler", default="euler_a")
    args = parser.parse_args(argv)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(make_tiny(Path(tmp) / "tiny", "epsilon"))
        result = measure(model_dir, args.size, args.steps, args.batch, args.repeats, args.sampler)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
