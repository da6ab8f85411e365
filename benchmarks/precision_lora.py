"""Does bf16 mixed precision change what a LoRA learns? The demo LoRA trained in fp32 and in bf16.

    python benchmarks/precision_lora.py OUT_DIR [--base models/tiny-base] [--precisions no bf16] [--seeds 0 1]

For each seed and precision it trains the LoRA demo (recipes/tiny_demo.yaml: the trigger
word for the pair the shipped base never saw, ``sdtune.tiny_base.trigger_lora_recipe``) with
``train.mixed_precision`` set, then prints one JSON line: the training time, the mean
training loss of the last 100 steps, the final validation loss (mean over its timesteps),
and, drawn with the LoRA at weight 1 on 16 seeds with euler_a and DDIM, the share of
trigger prompts judged (tests/judge.py) as the held-out pair. Seeds differ in the noise,
the batches and the held-out images, so the spread across seeds is the noise a precision's
difference is measured against. Each run is a process of its own. docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the checkout, and the judge beside the tests

import torch  # noqa: E402

from drawing import HELD_OUT_SCENE, SEEDS, draw, judged, trigger_prompts  # noqa: E402
from sdtune.pipeline import load_pipeline  # noqa: E402
from sdtune.tiny_base import trigger_lora_recipe  # noqa: E402
from sdtune.train import train  # noqa: E402


def run(base: Path, out: Path, precision: str, seed: int) -> dict:
    name = f"{precision}-seed{seed}"
    recipe = trigger_lora_recipe(base, out, seed=seed, overrides=[
        f"train.mixed_precision={precision}", "train.logger=none", "preview.prompts=[]",
        f"output.dir={out / name}", f"output.name={name}", "output.overwrite=true"])
    start = time.perf_counter()
    result = train(recipe)
    seconds = time.perf_counter() - start
    step, losses = result.validation[-1]
    model = load_pipeline(base, [result.output], device=torch.device("cpu"))
    drawn = {sampler: judged(draw(model, trigger_prompts(), SEEDS, sampler, lora_weight=1.0), [HELD_OUT_SCENE] * len(SEEDS))["all"]
             for sampler in ("euler_a", "ddim")}
    return {"precision": precision, "seed": seed, "train_s": round(seconds, 1), "steps": result.steps,
            "train_loss_last_100": sum(result.losses[-100:]) / len(result.losses[-100:]),
            "validation_step": step, "validation_loss": sum(losses.values()) / len(losses),
            "trigger_drawn_as_held_out_pair": drawn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", type=Path, default=ROOT / "models" / "tiny-base")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args()
    if len(args.seeds) == 1 and len(args.precisions) == 1:
        print(json.dumps(run(args.base, args.out, args.precisions[0], args.seeds[0])), flush=True)
        return
    for seed in args.seeds:  # one process per run: accelerate's state is set once per process
        for precision in args.precisions:
            subprocess.run([sys.executable, __file__, str(args.out), "--base", str(args.base), "--precisions", precision,
                            "--seeds", str(seed)], check=True)


if __name__ == "__main__":
    main()
