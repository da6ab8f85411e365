#!/usr/bin/env bash
# How this folder (models/tiny-base) and models/tiny-base-zwx.safetensors beside it are
# made, from the repository root after `bash launch.sh` has set up .venv. Reproducible
# from the seed: the same seed writes the same 2000 images, trains the same VAE and starts
# the UNet and text encoder from the same random weights (thread counts change float
# sums only in their order). On the 2-core CPU sandbox with nothing else running: the VAE
# about 8 minutes (5500 small steps), the UNet and text encoder about 27 minutes (12000
# steps of 16 at ~7 steps/s on two threads), the trigger LoRA about a minute. The work
# folder models/tiny-base-build keeps the data, the caches, report.html, the previews and
# the single-file checkpoint; tiny-base.build.json here records each stage (docs/tiny_base.md
# has every judged figure).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
self=$(cat "$0")  # this script lives in the folder it rebuilds
rm -rf models/tiny-base models/tiny-base-build models/tiny-base-lora models/tiny-base-zwx.safetensors
.venv/bin/sdtune make-tiny models/tiny-base --trained --seed 0
printf '%s\n' "$self" > models/tiny-base/build.sh
.venv/bin/python -c "
import shutil
from sdtune.tiny_base import train_trigger_lora
shutil.copy(train_trigger_lora('models/tiny-base', 'models/tiny-base-lora', seed=0), 'models/tiny-base-zwx.safetensors')"
