"""The ``sdtune`` command: ``make-tiny DIR``, ``train --recipe R``, ``data DIR|--recipe R``, ``cache --recipe R``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sdtune.recipe import PREDICTION_ALIASES, Recipe, RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sdtune", description="Fine-tune Stable Diffusion 1.x/2.x.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight SD model (diffusers folder)")
    tiny.add_argument("dir", help="folder to create")
    tiny.add_argument("--prediction", choices=["eps", "v"], default="eps", help="prediction type of its scheduler")
    tiny.add_argument("--seed", type=int, default=0)

    commands.add_parser("train", help="train from a recipe (same as sdtune/train.py)", add_help=False)

    data = commands.add_parser("data", help="scan a dataset: problems, summary and bucket histogram, no training")
    data.add_argument("dir", nargs="?", help="a dataset folder (same as --set data.path=DIR)")
    _recipe_arguments(data, required=False)

    cache = commands.add_parser(
        "cache", help="fill the latent and text caches of a recipe ahead of training (works under accelerate launch)"
    )
    _recipe_arguments(cache, required=True)

    if argv[:1] == ["train"]:
        from sdtune.train import main as train_main

        return _run(lambda: train_main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "make-tiny":
        from sdtune.tiny import make_tiny

        return _run(lambda: print(make_tiny(args.dir, PREDICTION_ALIASES[args.prediction], args.seed)))
    if args.command == "data":
        overrides = args.overrides + ([f"data.path={args.dir}", "data.sources=[]"] if args.dir else [])
        return _run(lambda: describe_data(load_recipe(args.recipe, overrides)))
    if args.command == "cache":
        return _run(lambda: build_caches(load_recipe(args.recipe, args.overrides)))
    return 2


def _recipe_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--recipe", required=required, help="recipe YAML" + ("" if required else " (default: the defaults)"))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field"
    )


def describe_data(recipe: Recipe) -> None:
    """Scan and bucket the recipe's data the way a run would; print what it found.

    Bad images are listed, not fatal, so one look shows all of them; the exit
    status says whether a run with the recipe's settings would start.
    """
    from sdtune.data.plan import format_problems, summary
    from sdtune.tiny import clip_tokenizer
    from sdtune.train import plan_data

    # SD 1.x and 2.x tokenize with the same BPE; the bundled copy counts tokens without a model.
    plan = plan_data(recipe.data.model_copy(update={"on_bad_image": "skip"}), recipe.train.seed, clip_tokenizer())
    print(summary(plan))
    if plan.skipped and recipe.data.on_bad_image == "fail":
        raise ValueError(
            "\n".join(
                [f"a run would stop on {len(plan.skipped)} bad image(s):", *format_problems(plan.skipped, []),
                 "set data.on_bad_image: skip to train without them"]
            )
        )


def build_caches(recipe: Recipe) -> None:
    """What a run does before step 1, and no more: scan, then encode every missing
    latent (and text-encoder output), each process of `accelerate launch` its share."""
    import torch
    from accelerate import Accelerator

    from sdtune.data.cache import cache_latents, cache_text, default_cache_dir, summed
    from sdtune.models import load_components
    from sdtune.train import plan_data

    model, data = recipe.model, recipe.data
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main = accelerator.is_local_main_process
    parts = load_components(model.path, model.prediction_type, model.zero_terminal_snr)
    plan = plan_data(data, recipe.train.seed, parts.tokenizer)
    items = plan.train + plan.validation
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    shard = (accelerator.process_index, accelerator.num_processes)
    if is_main:
        print(f"sdtune: {plan.images} images, {len(items)} views to cache in {cache_dir}")
    _, latent_stats = cache_latents(items, parts.vae, parts.vae_sha256, cache_dir, accelerator.device, shard=shard, show_progress=is_main)
    text_stats = None
    # Shuffled tags or a trained text encoder leave nothing for the text cache.
    if not data.shuffle_tags and not (recipe.train.method == "lora" and recipe.lora.text_encoder):
        _, text_stats = cache_text(
            [i.caption for i in items] + [""], parts.tokenizer, parts.text_encoder, parts.text_encoder_sha256,
            cache_dir, accelerator.device, shard=shard, show_progress=is_main,
        )
    accelerator.wait_for_everyone()
    latent_stats = summed(latent_stats, accelerator)
    text_stats = summed(text_stats, accelerator) if text_stats else None
    if is_main:
        print(
            f"sdtune: latent cache {latent_stats.encoded} encoded, {latent_stats.reused} reused, "
            f"{latent_stats.invalidated} invalidated ({cache_dir})"
        )
        if text_stats:
            print(f"sdtune: text cache {text_stats.encoded} encoded, {text_stats.reused} reused")
    accelerator.end_training()


def _run(action) -> int:
    """Expected failures (bad recipe, missing files) print one clear message, not a
    traceback; SDTUNE_DEBUG=1 shows the traceback too."""
    try:
        action()
    except (RecipeError, FileNotFoundError, FileExistsError, ValueError) as exc:
        if os.environ.get("SDTUNE_DEBUG"):
            raise
        print(f"sdtune: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
