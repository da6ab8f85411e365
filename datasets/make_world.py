"""Generate the tiny trained base's training set: the sample's world in thousands of images.

Usage::

    python datasets/make_world.py OUT_DIR [--count 2000] [--seed 0]
    python datasets/make_world.py OUT_DIR --trigger [--count 64]   # the LoRA demo's set

Writes ``00000.png`` + ``00000.txt`` per image (64x64, one flat shape on a solid
background, captioned in datasets/sample's grammar) and ``world.json``, every
image's ground truth. The same seed writes the same images. The generator is
``sdtune/world.py`` (``sdtune make-tiny DIR --trained`` calls it at build
time); this script is the way to look at the data on its own. The sets are
generated, not committed.
"""

from __future__ import annotations

import argparse
import sys

from sdtune.world import TRIGGER, scenes, trigger_scenes, write_dataset


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make_world.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to create")
    parser.add_argument("--count", type=int, default=None, help="images (default: 2000, or 64 with --trigger)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trigger", nargs="?", const=TRIGGER, default=None,
                        help=f"write the LoRA demo's set instead, captioned with this trigger word (default {TRIGGER})")
    args = parser.parse_args(argv)
    if args.trigger:
        items = trigger_scenes(args.count or 64, args.seed, args.trigger)
    else:
        items = scenes(args.count or 2000, args.seed)
    out = write_dataset(args.out, items)
    print(f"wrote {len(items)} images with captions to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
