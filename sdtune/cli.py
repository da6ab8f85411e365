"""The ``sdtune`` command: ``make-tiny``, ``train``, ``sample``, ``data``, ``cache``, ``export`` (LoRA and checkpoint conversions), ``inspect``.

Under accelerate, every command runs as ``accelerate launch -m sdtune COMMAND ...``
(``accelerate launch sdtune/train.py ...`` is the same as ``... -m sdtune train ...``).
Flags that set what a recipe field sets are named like it (``--prediction-type``
for ``model.prediction_type``, ``--zero-terminal-snr``, ``--allow-pickle``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdtune.errors import run_command, take_debug_flag
from sdtune.recipe import PREDICTION_ALIASES, Recipe, load_recipe

TINY_ARCHES = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def main(argv: list[str] | None = None) -> int:
    argv = take_debug_flag(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(
        prog="sdtune", description="Fine-tune Stable Diffusion 1.x/2.x.",
        epilog="--debug (anywhere) or SDTUNE_DEBUG=1: show the traceback of an error. Exit statuses: 0 done, "
        "2 a setting or file to fix, 3 training stopped on a non-finite loss, 4 out of memory, 128+N stopped by signal N.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight SD model (diffusers folder)")
    tiny.add_argument("dir", help="folder to create")
    tiny.add_argument("--prediction-type", "--prediction", dest="prediction", choices=sorted(PREDICTION_ALIASES), default="epsilon",
                      help="prediction type of its scheduler (model.prediction_type; eps and v are short forms)")
    tiny.add_argument("--arch", choices=sorted(TINY_ARCHES), default="sd1", help="block layout and text encoder(s) of SD 1.x, SD 2.x or SDXL")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--trained", action="store_true",
                      help="train it from scratch on the generated world of the sample (sdtune/tiny_base.py; about 35 min on 2 CPU cores; docs/tiny_base.md)")
    tiny.add_argument("--images", type=int, default=2000, help="with --trained: generated training images")
    tiny.add_argument("--vae-steps", type=int, default=4000, help="with --trained: VAE training steps (then 3/8 as many weighting the shapes)")
    tiny.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="with --trained: override a field of recipes/tiny_base.yaml, e.g. train.max_steps=500")

    commands.add_parser("train", help="train from a recipe (sdtune/train.py)", add_help=False)
    commands.add_parser("sample", help="generate images, X/Y grids and base-vs-fine-tune comparisons", add_help=False)

    export = commands.add_parser("export", help="convert LoRAs and checkpoints into files the UIs load")
    kinds = export.add_subparsers(dest="kind", required=True)
    lora = kinds.add_parser("lora", help="PEFT/diffusers LoRA (file, or peft folder) -> kohya LoRA file")
    lora.add_argument("src")
    lora.add_argument("out", help="the kohya .safetensors to write")
    lora.add_argument("--alpha", type=float, help="the lora_alpha it was trained with (default: from adapter_config.json or the file's metadata, else the rank)")
    lora.add_argument("--base-version", choices=["sd_v1", "sd_v2", "sdxl_base_v1-0"], help="SD version it was trained on (default: from its shapes)")
    merge = kinds.add_parser("merge", help="kohya LoRA merged into a base model -> single-file checkpoint")
    merge.add_argument("lora")
    merge.add_argument("out", help="the single-file .safetensors to write")
    merge.add_argument("--base", required=True, help="base model: diffusers folder or single file")
    merge.add_argument("--multiplier", type=float, default=1.0, help="LoRA strength, as in the UIs")
    checkpoint = kinds.add_parser("checkpoint", help="diffusers folder (or single file) -> single-file checkpoint")
    diffusers = kinds.add_parser("diffusers", help="single-file checkpoint -> diffusers folder")
    for sub, what in ((checkpoint, "single-file .safetensors"), (diffusers, "diffusers folder")):
        sub.add_argument("src")
        sub.add_argument("out", help=f"the {what} to write")
    for sub in (lora, merge, checkpoint, diffusers):
        sub.add_argument("--prediction-type", "--prediction", dest="prediction", choices=sorted(PREDICTION_ALIASES),
                         help="prediction type, as model.prediction_type (default: what the source states, else epsilon)")
        sub.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output")
    for sub in (lora, merge, checkpoint, diffusers):
        sub.add_argument("--allow-pickle", action="store_true", help="read pickled weights (.ckpt, .bin, .pt) as tensors only (torch.load weights_only=True)")
    for sub in (merge, checkpoint, diffusers):
        sub.add_argument("--zero-terminal-snr", "--ztsnr", dest="ztsnr", action=argparse.BooleanOptionalAction, default=None,
                         help="zero terminal SNR, as model.zero_terminal_snr (default: what the source states)")

    inspect = commands.add_parser("inspect", help="say what a .safetensors is and what a UI would drop or misread")
    inspect.add_argument("file")
    inspect.add_argument("--allow-pickle", action="store_true", help="read a .ckpt (torch.load weights_only=True)")

    data = commands.add_parser("data", help="scan a dataset: problems, summary and bucket histogram, no training")
    data.add_argument("dir", nargs="?", help="a dataset folder (same as --set data.path=DIR)")
    _recipe_arguments(data, required=False)

    cache = commands.add_parser(
        "cache", help="fill the latent and text caches of a recipe ahead of training (works under accelerate launch)"
    )
    _recipe_arguments(cache, required=True)

    if argv[:1] == ["train"]:
        from sdtune.train import main as train_main

        return run_command(lambda: train_main(argv[1:]))
    if argv[:1] == ["sample"]:
        from sdtune.sample import main as sample_main

        return run_command(lambda: sample_main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command in ("make-tiny", "export"):
        _quiet_saving()
    if args.command == "make-tiny" and args.trained:
        from sdtune.tiny_base import build_trained_base

        return run_command(lambda: print(build_trained_base(args.dir, args.seed, args.images, args.vae_steps, args.overrides, arch=TINY_ARCHES[args.arch])))
    if args.command == "make-tiny":
        from sdtune.tiny import make_tiny

        return run_command(lambda: print(make_tiny(args.dir, PREDICTION_ALIASES[args.prediction], args.seed, TINY_ARCHES[args.arch])))
    if args.command == "export":
        return run_command(lambda: _export(args))
    if args.command == "inspect":
        from sdtune.export.inspect import inspect_file

        return run_command(lambda: print(inspect_file(args.file, args.allow_pickle).text()))
    if args.command == "data":
        overrides = args.overrides + ([f"data.path={args.dir}", "data.sources=[]"] if args.dir else [])
        return run_command(lambda: describe_data(load_recipe(args.recipe, overrides)))
    if args.command == "cache":
        return run_command(lambda: build_caches(load_recipe(args.recipe, args.overrides)))
    return 2


def _export(args: argparse.Namespace) -> None:
    from sdtune.export import commands

    prediction = PREDICTION_ALIASES[args.prediction] if args.prediction else None
    common = {"dtype": args.dtype, "overwrite": args.overwrite, "allow_pickle": args.allow_pickle}
    if args.kind == "lora":
        written = commands.export_lora(
            args.src, args.out, alpha=args.alpha, base_version=args.base_version, prediction=prediction or "epsilon", **common
        )
    else:
        common |= {"prediction": prediction, "zero_terminal_snr": args.ztsnr}
        if args.kind == "merge":
            written = commands.export_merge(args.lora, args.base, args.out, multiplier=args.multiplier, **common)
        elif args.kind == "checkpoint":
            written = commands.export_checkpoint(args.src, args.out, **common)
        else:
            written = commands.export_diffusers(args.src, args.out, **common)
    for path in written:
        print(f"sdtune: wrote {path}")



def _quiet_saving() -> None:
    """diffusers' and transformers' per-file "Writing model shards" bars say nothing here."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _recipe_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--recipe", required=required, help="recipe YAML" + ("" if required else " (default: the defaults)"))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field"
    )


def describe_data(recipe: Recipe) -> None:
    """Scan and bucket the recipe's data the way a run would; print what it found.

    Every problem is listed in one pass (missing captions, bad images, orphan
    captions), none is fatal to the scan; the exit status says whether a run with
    the recipe's settings would start.
    """
    from sdtune.data.plan import format_problems, plan_data, summary, verdict
    from sdtune.errors import DataError
    from sdtune.tiny import clip_tokenizer

    # SD 1.x and 2.x tokenize with the same BPE; the bundled copy counts tokens without a model.
    data = recipe.data
    plan = plan_data(data, recipe.train.seed, clip_tokenizer(), check=False)
    print(summary(plan))
    uncaptioned = [p for p in plan.problems if p.kind == "no_caption"]
    if uncaptioned:
        print("\n".join(["images without a caption:", *format_problems(uncaptioned, [])]))
    stop = verdict(plan, data.missing_caption, data.on_bad_image)
    if stop:
        raise DataError(stop)


def build_caches(recipe: Recipe) -> None:
    """What a run does before step 1, and no more: scan, then encode every missing
    latent (and text-encoder output), each process of `accelerate launch` its share.
    DreamBooth class images a folder lacks are drawn first, as a run draws them."""
    import torch
    from accelerate import Accelerator

    from sdtune.data.cache import default_cache_dir, fill_caches
    from sdtune.data.class_images import fill_class_folders
    from sdtune.data.plan import plan_data
    from sdtune.models import load_components
    from sdtune.tiny import clip_tokenizer

    model, data = recipe.model, recipe.data
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    fill_class_folders(data.sources, model.path, model.allow_pickle, data.resolution, recipe.train.seed, accelerator)
    plan = plan_data(data, recipe.train.seed, clip_tokenizer())
    parts = load_components(model.path, model.prediction_type, model.zero_terminal_snr, allow_pickle=model.allow_pickle)
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    if accelerator.is_local_main_process:
        print(f"sdtune: {plan.images} images, {len(plan.train) + len(plan.validation)} views to cache in {cache_dir}")
    fill_caches(plan, parts, cache_dir, accelerator, recipe.caches_text)
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
