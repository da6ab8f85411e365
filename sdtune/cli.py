"""The ``sdtune`` command: ``sdtune make-tiny DIR``, ``sdtune train --recipe R``, ``sdtune sample ...``."""

from __future__ import annotations

import argparse
import os
import sys

from sdtune.recipe import PREDICTION_ALIASES, RecipeError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sdtune", description="Fine-tune Stable Diffusion 1.x/2.x.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight SD model (diffusers folder)")
    tiny.add_argument("dir", help="folder to create")
    tiny.add_argument("--prediction", choices=["eps", "v"], default="eps", help="prediction type of its scheduler")
    tiny.add_argument("--seed", type=int, default=0)

    commands.add_parser("train", help="train from a recipe (same as sdtune/train.py)", add_help=False)
    commands.add_parser("sample", help="generate images, X/Y grids and base-vs-fine-tune comparisons", add_help=False)

    if argv[:1] == ["train"]:
        from sdtune.train import main as train_main

        return _run(lambda: train_main(argv[1:]))
    if argv[:1] == ["sample"]:
        from sdtune.sample import main as sample_main

        return _run(lambda: sample_main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "make-tiny":
        from sdtune.tiny import make_tiny

        return _run(lambda: print(make_tiny(args.dir, PREDICTION_ALIASES[args.prediction], args.seed)))
    return 2


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
