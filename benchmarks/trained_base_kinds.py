"""Textual inversion and DreamBooth on the trained tiny base, judged in pixels like the LoRA demo.

    python benchmarks/trained_base_kinds.py OUT_DIR [--base models/tiny-base] [--steps 600] [--seeds 42 0 1]

Each kind learns the word the base never saw (``zwx``: a pink shape on a green background,
``sdtune.world.HELD_OUT``) from the LoRA demo's 64 trigger images, through the shipped
recipes (recipes/textual_inversion.yaml, recipes/dreambooth.yaml) with the tiny model's
size, rate and steps set:

- textual inversion: two new vectors for ``zwx``, everything else frozen;
- DreamBooth (a LoRA, as recipes/dreambooth.yaml trains it), with prior preservation
  (64 class images of ``a circle in the center`` drawn by the base, weight 1) and without.

Printed per run, on 16 seeds, judged by tests/judge.py: trigger prompts drawn as the
held-out pair; the 16 base prompts (colours named) with both colours right, which drift
lowers; and the bare class prompt (``a circle in the center``) drawn as the held-out pair,
the language drift prior preservation is there to stop. With several ``--seeds`` each kind
trains once per seed (train.seed: the noise, the batches, the class images drawn) and the
mean over the seeds closes each kind's lines. docs/tiny_base.md records a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the checkout, and the judge beside the tests

import torch  # noqa: E402

from drawing import HELD_OUT_SCENE, SEEDS, draw, judged, prompt_scenes, trigger_prompts  # noqa: E402
from sdtune import world  # noqa: E402
from sdtune.pipeline import load_pipeline  # noqa: E402
from sdtune.recipe import load_recipe  # noqa: E402
from sdtune.textual_inversion import load_into_pipeline  # noqa: E402
from sdtune.train import train  # noqa: E402

CLASS_PROMPT = "a circle in the center"


def common(base: Path, out: Path, name: str, steps: int, seed: int) -> list[str]:
    return [f"train.seed={seed}", f"model.path={base}", "model.prediction_type=v_prediction", "model.zero_terminal_snr=true",
            "data.resolution=64", "data.num_workers=0", "data.validation_split=0", f"data.cache_dir={out / 'cache'}",
            f"train.max_steps={steps}", "train.batch_size=8", "train.mixed_precision=no", "train.gradient_checkpointing=false",
            "train.lr_warmup_steps=20", "train.min_snr_gamma=5", "train.logger=none", "preview.prompts=[]",
            f"output.dir={out / name}", f"output.name={name}", "output.overwrite=true"]


def rates(model, lora_weight: float | None = None) -> dict[str, float]:
    scenes = prompt_scenes()
    trigger = judged(draw(model, trigger_prompts(), SEEDS, lora_weight=lora_weight), [HELD_OUT_SCENE] * len(SEEDS))["all"]
    base = judged(draw(model, [s.caption for s in scenes], SEEDS, lora_weight=lora_weight), scenes)["all"]
    bare = judged(draw(model, [CLASS_PROMPT] * len(SEEDS), SEEDS, lora_weight=lora_weight), [HELD_OUT_SCENE] * len(SEEDS))["all"]
    return {"trigger_drawn_as_held_out_pair": trigger, "base_prompts_both_colours": base,
            "class_prompt_drawn_as_held_out_pair": bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", type=Path, default=ROOT / "models" / "tiny-base")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="train.seed of each kind's runs (default 42)")
    args = parser.parse_args()
    out, base = args.out, args.base
    trigger = out / "trigger-64-seed0"
    if not trigger.exists():
        world.write_dataset(trigger, world.trigger_scenes(64, 0))
    results = {"base alone": [rates(load_pipeline(base, device=torch.device("cpu")))]}
    show("base alone", results["base alone"][0])
    for seed in args.seeds:
        for name, figures in run_seed(base, out, trigger, args.steps, seed):
            results.setdefault(name, []).append(figures)
            show(f"{name}, seed {seed}", figures)
    if len(args.seeds) > 1:
        for name, runs in results.items():
            if len(runs) > 1:
                show(f"{name}, mean of {len(runs)} seeds", {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]})


def show(name: str, figures: dict[str, float]) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.0%}" for k, v in figures.items()), flush=True)


def run_seed(base: Path, out: Path, trigger: Path, steps: int, seed: int):
    """Each kind trained with ``seed``, as (name, rates) pairs."""
    ti = train(load_recipe(ROOT / "recipes" / "textual_inversion.yaml", [
        *common(base, out, f"ti-{seed}", steps, seed), f"data.path={trigger}", f"embedding.token={world.TRIGGER}",
        "embedding.init_word=red", "embedding.vectors=2", "train.learning_rate=5e-3"]))
    model = load_pipeline(base, device=torch.device("cpu"))
    load_into_pipeline(model.pipe, ti.output, world.TRIGGER, False)
    yield "textual inversion", rates(model)

    instance = {"path": str(trigger)}
    classes = {"path": str(out / f"class-circle-{seed}"), "class_images": True, "class_prompt": CLASS_PROMPT,
               "num_class_images": 64}
    for name, sources in (("dreambooth", [instance, classes]), ("dreambooth-no-prior", [instance])):
        result = train(load_recipe(ROOT / "recipes" / "dreambooth.yaml", [
            *common(base, out, f"{name}-{seed}", steps, seed), f"data.sources={json.dumps(sources)}", "lora.rank=8",
            "lora.alpha=8", "train.learning_rate=1e-3"]))
        model = load_pipeline(base, [result.output], device=torch.device("cpu"))
        yield f"{name}, LoRA at 1", rates(model, 1.0)

if __name__ == "__main__":
    main()
