"""Latent-cache speed: build the cache of the sample dataset on the tiny model, then an all-hit pass.

    python benchmarks/cache.py [--resolution 64] [--bucket-step 16] [--flip]

Prints one JSON object. The first pass includes the scan (hashing and decoding
every file) and the VAE encodes; the second pass finds every entry and encodes
nothing, which is what a second run (or another recipe over the same images)
pays before step 1. A fresh temporary cache is used, so runs are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

import torch

from sdtune.data.cache import cache_latents
from sdtune.data.plan import BucketSpec, plan_dataset
from sdtune.data.sources import Source
from sdtune.models import load_components
from sdtune.tiny import make_tiny

SAMPLE = Path(__file__).resolve().parent.parent / "datasets" / "sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--bucket-step", type=int, default=16)
    parser.add_argument("--flip", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(Path(tmp) / "tiny", "epsilon")
        parts = load_components(model, "epsilon", False)
        cache = Path(tmp) / "cache"

        def one_pass():
            started = time.perf_counter()
            plan = plan_dataset([Source(str(SAMPLE))], BucketSpec(args.resolution, args.bucket_step), flip=args.flip)
            scanned = time.perf_counter()
            _, stats = cache_latents(plan.train, parts.vae, parts.vae_sha256, cache, device, show_progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return plan, stats, scanned - started, time.perf_counter() - started

        plan, first, first_scan, first_total = one_pass()
        _, second, second_scan, second_total = one_pass()
    print(json.dumps({
        "dataset": "datasets/sample",
        "images": plan.images,
        "latents": first.encoded,
        "resolution": args.resolution,
        "bucket_step": args.bucket_step,
        "buckets_used": len({i.crop.bucket for i in plan.train}),
        "first_pass_s": round(first_total, 3),
        "first_pass_scan_s": round(first_scan, 3),
        "build_images_per_s": round(first.encoded / first_total, 1),
        "second_pass_s": round(second_total, 3),
        "second_pass_scan_s": round(second_scan, 3),
        "second_pass_hits": second.reused,
        "second_pass_encoded": second.encoded,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
