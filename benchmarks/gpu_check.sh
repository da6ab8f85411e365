#!/usr/bin/env bash
# The GPU figures issue 13 asks for, in one command on a lent GPU machine (docs/benchmarks.md, "On a GPU").
#
#   bash benchmarks/gpu_wheels.sh                        # here, first: the wheels the GPU image lacks, into .whl/
#   device tool: run  command "bash benchmarks/gpu_check.sh"  carry [".whl"]  timeout_s 540
#
# The training benchmark (benchmarks/train.py) on SD 1.5's topology at 512 px, bf16, LoRA:
# batch 1 and 4, each without and with gradient checkpointing, then batch 1 with
# train.compile=inductor (does the compiled bf16 step keep every LoRA layer's gradient on a
# GPU? on a CPU it does not, docs/benchmarks.md). Each run's JSON (s/step, floor, peak CUDA
# memory, FLOPs, achieved TFLOP/s, MFU) is one line of $OUT/gpu.jsonl; everything printed
# is in $OUT/gpu.log. The runs go in that order, each under its own time limit, so a command
# stopped at its limit still returns what finished.
#
# GPU_CHECK_QUICK=1 runs the same sequence on the tiny model, a few steps each: a dry run of
# this script on a machine without a GPU (with train.compile=aot_eager, as a CPU refuses
# inductor with bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdtune-gpu-check} LOG=gpu.log
source benchmarks/gpu_setup.sh  # everything printed from here on is also in $OUT/$LOG

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
    model=(--model tiny) steps=(--steps 4 --warmup 1) batches=(2 4) compile=aot_eager limit=300
else
    model=(--model sd15 --model-dir /tmp/sdtune-sd15) steps=(--steps 14 --warmup 4) batches=(1 4) compile=inductor limit=150
fi
common=("${model[@]}" "${steps[@]}" --set train.mixed_precision=bf16 --set data.max_aspect_ratio=1)

run() {  # run NAME LIMIT_S ARGS...: one benchmark, its JSON line appended to gpu.jsonl
    local name=$1 limit=$2
    shift 2
    echo "== $name: benchmarks/train.py $*"
    local started=$SECONDS
    if timeout "$limit" "$PY" benchmarks/train.py "$@" >"$OUT/$name.json"; then
        printf '{"run": "%s", "figures": %s}\n' "$name" "$(cat "$OUT/$name.json")" >>"$OUT/gpu.jsonl"
        cat "$OUT/$name.json"
    else
        echo "== $name failed or ran past ${limit}s (exit $?)"
    fi
    rm -f "$OUT/$name.json"  # the line in gpu.jsonl holds it (the device tool returns at most 8 files)
    echo "== $name took $((SECONDS - started)) s"
}

# The first run also builds the model (random weights from sdtune/configs/sd_v1.json, about 4 GB).
build=120
for batch in "${batches[@]}"; do
    for checkpointing in false true; do
        run "bf16-b$batch-gc-$checkpointing" $((limit + build)) "${common[@]}" --batch-size "$batch" \
            --set train.gradient_checkpointing=$checkpointing
        build=0
    done
done
# Compiling takes minutes; sdtune's end-of-run check prints any LoRA layer no gradient reached.
run "bf16-b${batches[0]}-compile-$compile" $((limit * 2)) "${common[@]}" --batch-size "${batches[0]}" --set train.compile=$compile
grep -h "LoRA layers change nothing" "$OUT/gpu.log" || echo "gpu_check.sh: no run reported LoRA layers without a gradient"
date -u
