#!/usr/bin/env bash
# Issue 12's GPU runs, in one command on a lent GPU machine (docs/distributed.md, "FSDP", "DeepSpeed"):
#
#   bash benchmarks/gpu_wheels.sh                        # here, first: the wheels the GPU image lacks, into .whl/
#   device tool: run  command "bash benchmarks/gpu_fsdp.sh"  carry [".whl"]  timeout_s 590
#
# A full fine-tune (train.optimizer: adamw, bf16, batch 1) under recipes/accelerate/fsdp.yaml
# and under deepspeed_zero2.yaml (optimizer offload: DeepSpeed builds its CPU Adam on first use)
# with 1 process, against the same run under one_gpu.yaml, on the tiny model and then on SD
# 1.5's topology (random weights, 512 px): steps/s and peak GPU memory from the trainer's
# closing line, one JSON line each in $OUT/fsdp.jsonl. Each run writes a sharded checkpoint
# halfway and its result from the gathered weights (on a GPU through offload_to_cpu, which CPU
# processes cannot use); the tiny FSDP run is then resumed from that checkpoint and its
# result compared with the uninterrupted one's (CUDA kernels are not bit-exact: the largest
# difference is printed). Everything printed is in $OUT/fsdp.log.
#
# GPU_FSDP_QUICK=1 is a dry run without a GPU: the tiny model only, FSDP and DeepSpeed on 2 CPU
# processes through tests/fsdp_on_cpu.py and tests/deepspeed_on_cpu.py, the baseline one CPU
# process, in fp32.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdtune-gpu-fsdp} LOG=fsdp.log
source benchmarks/gpu_setup.sh  # everything printed from here on is also in $OUT/$LOG

WORK=/tmp/sdtune-gpu-fsdp-work
mkdir -p "$WORK"
if [ "${GPU_FSDP_QUICK:-0}" = 1 ]; then
    models=(tiny) steps=6 precision=no
    "$PY" - "$WORK/fsdp.yaml" <<'PY'
import sys, yaml
config = yaml.safe_load(open("recipes/accelerate/fsdp.yaml"))
yaml.safe_dump(config | {"use_cpu": True, "num_processes": 2, "mixed_precision": "no"}, open(sys.argv[1], "w"))
PY
    fsdp=(env ACCELERATE_USE_CPU=1 "$PY" -m accelerate.commands.launch -q --config_file "$WORK/fsdp.yaml" tests/fsdp_on_cpu.py)
    "$PY" - "$WORK/deepspeed.yaml" <<'PY'
import sys, yaml
config = yaml.safe_load(open("recipes/accelerate/deepspeed_zero2.yaml"))
yaml.safe_dump(config | {"num_processes": 2, "mixed_precision": "no", "gpu_ids": None}, open(sys.argv[1], "w"))
PY
    deepspeed=(env -u ACCELERATE_USE_CPU DS_ACCELERATOR=cpu "$PY" -m accelerate.commands.launch -q --config_file "$WORK/deepspeed.yaml"
               tests/deepspeed_on_cpu.py)
    single=("$PY" sdtune/train.py)
else
    models=(tiny sd15) steps=20 precision=bf16
    fsdp=("$PY" -m accelerate.commands.launch -q --config_file recipes/accelerate/fsdp.yaml --num_processes 1 sdtune/train.py)
    deepspeed=("$PY" -m accelerate.commands.launch -q --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes 1
               sdtune/train.py)
    single=("$PY" -m accelerate.commands.launch -q --config_file recipes/accelerate/one_gpu.yaml sdtune/train.py)
fi

model_dir() {  # model_dir KIND: the model's diffusers folder, built once
    "$PY" - "$1" "$WORK/$1" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from train import model_folder
print(model_folder(sys.argv[1], Path(sys.argv[2])))
PY
}

train() {  # train NAME MODEL_DIR RESOLUTION LAUNCHER... -- EXTRA...: one run; its closing line into fsdp.jsonl
    local name=$1 model=$2 resolution=$3
    shift 3
    local launcher=() extra=()
    while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
    shift
    extra=("$@")
    echo "== $name"
    local started=$SECONDS
    "${launcher[@]}" --recipe recipes/full_finetune.yaml --set "model.path=$model" --set data.path=datasets/sample \
        --set "data.resolution=$resolution" --set "data.cache_dir=$WORK/cache" --set "output.dir=$WORK/out-$name" \
        --set output.overwrite=true --set train.optimizer=adamw --set train.batch_size=1 --set train.gradient_accumulation_steps=1 \
        --set "train.max_steps=$steps" --set train.lr_warmup_steps=0 --set "train.mixed_precision=$precision" \
        --set train.logger=none --set "checkpoint.every_steps=$((steps / 2))" --set export.dtype=fp32 "${extra[@]}" \
        >"$WORK/$name.out"
    local status=$?
    cat "$WORK/$name.out"
    local line
    line=$(grep -h "sdtune: trained " "$WORK/$name.out" | tail -1)
    printf '{"run": "%s", "exit": %d, "seconds": %d, "closing_line": "%s"}\n' "$name" "$status" $((SECONDS - started)) "$line" >>"$OUT/fsdp.jsonl"
}

for kind in "${models[@]}"; do
    model=$(model_dir "$kind") || { echo "gpu_fsdp.sh: building the $kind model failed"; exit 1; }
    resolution=$([ "$kind" = tiny ] && echo 64 || echo 512)
    train "$kind-one-gpu" "$model" "$resolution" "${single[@]}" --
    train "$kind-fsdp" "$model" "$resolution" "${fsdp[@]}" --
    train "$kind-deepspeed" "$model" "$resolution" "${deepspeed[@]}" --
done

# The tiny FSDP and DeepSpeed runs again from their halfway checkpoints (copies of their folders,
# without the result), each compared with the uninterrupted run.
model=$(model_dir tiny)
for engine in fsdp deepspeed; do
    rm -rf "$WORK/out-tiny-$engine-resumed"
    cp -r "$WORK/out-tiny-$engine" "$WORK/out-tiny-$engine-resumed"
    rm -f "$WORK/out-tiny-$engine-resumed/my-finetune.safetensors"
    checkpoint=$(ls -d "$WORK"/out-tiny-$engine-resumed/checkpoints/my-finetune/step-* | head -1)
    launcher="$engine[@]"
    train "tiny-$engine-resumed" "$model" 64 "${!launcher}" -- --resume "$checkpoint"
    "$PY" - "$engine" "$WORK/out-tiny-$engine/my-finetune.safetensors" "$WORK/out-tiny-$engine-resumed/my-finetune.safetensors" <<'PY'
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[2]), load_file(sys.argv[3])
keys = [k for k in a if k.startswith("model.diffusion_model.") and a[k].numel()]
print(f"gpu_fsdp.sh: {sys.argv[1]} resumed against uninterrupted, UNet: largest difference "
      f"{max((a[k] - b[k]).abs().max().item() for k in keys):.3g} over {len(keys)} tensors")
PY
done
date -u
